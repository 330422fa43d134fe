//! `sqlx::migrate!` embeds the migration files at compile time, but cargo
//! does not know they are inputs: without this, an incremental build after
//! a new migration file keeps serving the old set ("no such column").

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

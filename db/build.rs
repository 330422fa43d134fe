//! `sqlx::migrate!` embeds the migration files at compile time but cannot
//! tell cargo about files added later: without this, a build after a new
//! migration lands keeps embedding the old set (and readiness would wait for
//! a schema the binary does not know about).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

//! The eight modules and the `*_enabled` fields that switch them.

use igny8_proto::settings::v1::Module;

/// Every module, in field order.
pub const MODULES: [Module; 8] = [
    Module::Planner,
    Module::Writer,
    Module::Thinker,
    Module::Automation,
    Module::SiteBuilder,
    Module::Linker,
    Module::Optimizer,
    Module::Publisher,
];

/// The `ModuleSettings` field (and table column) of each module, in
/// [`MODULES`] order.
pub const FIELDS: [&str; 8] = [
    "planner_enabled",
    "writer_enabled",
    "thinker_enabled",
    "automation_enabled",
    "site_builder_enabled",
    "linker_enabled",
    "optimizer_enabled",
    "publisher_enabled",
];

/// The index of a module in [`MODULES`]; `None` for `MODULE_UNSPECIFIED`.
pub fn index(module: Module) -> Option<usize> {
    MODULES.iter().position(|m| *m == module)
}

/// The index of a field name in [`FIELDS`]; the lowerCamelCase JSON name
/// (`writerEnabled`) is accepted too, as clients that build masks from JSON
/// names send it.
pub fn field_index(path: &str) -> Option<usize> {
    FIELDS.iter().position(|f| *f == path || camel(f) == path)
}

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.push(c.to_ascii_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_has_its_field() {
        for (i, m) in MODULES.iter().enumerate() {
            let name = m
                .as_str_name()
                .trim_start_matches("MODULE_")
                .to_ascii_lowercase();
            assert_eq!(FIELDS[i], format!("{name}_enabled"));
        }
        assert_eq!(index(Module::Unspecified), None);
        assert_eq!(field_index("site_builder_enabled"), Some(4));
        assert_eq!(field_index("siteBuilderEnabled"), Some(4));
        assert_eq!(field_index("SiteBuilderEnabled"), None);
    }
}

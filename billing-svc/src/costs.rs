//! The cost table (docs/api.md, "The cost table"): what each operation costs, as data.
//!
//! One pricing rule covers both kinds of operation. With `q` the quantity
//! (0 meaning one unit, i.e. `unit_size`):
//!
//! ```text
//! cost = max(1, floor(credits × q / unit_size))
//! ```
//!
//! Count-priced operations have `unit_size = 1`, so this is `credits × q`;
//! word-priced ones have `unit_size` = words per unit (100 for content,
//! 200 for optimisation), so 50 words of content cost 1 and 250 cost 2.

use std::{collections::HashMap, path::Path};

use serde::Deserialize;

/// Largest accepted quantity.
pub const MAX_QUANTITY: u64 = 1_000_000_000;

/// One operation's row.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationCost {
    /// Canonical name.
    #[serde(rename = "name")]
    pub operation: String,
    /// Legacy names that resolve to it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Credits per `unit_size` units.
    pub credits: i64,
    /// What is counted: `request`, `word`, `content_piece`, `image`, ...
    pub unit: String,
    /// Units that cost `credits` (1 for count-priced operations).
    #[serde(default = "one")]
    pub unit_size: u64,
    /// The module the operation belongs to.
    pub module: String,
}

fn one() -> u64 {
    1
}

/// A priced quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price<'a> {
    /// The row that priced it (canonical name, unit, base credits).
    pub cost: &'a OperationCost,
    /// The quantity priced, after defaulting 0 to one unit.
    pub quantity: u64,
    /// Total credits.
    pub credits: i64,
}

/// Why a price could not be computed. Both are the caller's mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// No such operation or alias.
    #[error("unknown operation {operation:?}; known operations: {}", known.join(", "))]
    UnknownOperation {
        /// What was asked for.
        operation: String,
        /// Canonical names, in table order.
        known: Vec<String>,
    },
    /// Over [`MAX_QUANTITY`], or the product overflows.
    #[error("quantity {0} is too large (at most 1000000000)")]
    QuantityTooLarge(u64),
}

/// The whole table, with alias resolution.
#[derive(Debug, Clone)]
pub struct CostTable {
    rows: Vec<OperationCost>,
    by_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    operation: Vec<OperationCost>,
}

impl Default for CostTable {
    fn default() -> Self {
        Self::builtin()
    }
}

impl CostTable {
    /// The table of docs/api.md.
    pub fn builtin() -> Self {
        let row = |name: &str, aliases: &[&str], credits, unit: &str, unit_size, module: &str| {
            OperationCost {
                operation: name.into(),
                aliases: aliases.iter().map(|a| (*a).into()).collect(),
                credits,
                unit: unit.into(),
                unit_size,
                module: module.into(),
            }
        };
        Self::new(vec![
            row("clustering", &[], 10, "request", 1, "planner"),
            row("idea_generation", &["ideas"], 15, "request", 1, "planner"),
            row("content_generation", &["content"], 1, "word", 100, "writer"),
            row(
                "image_prompt_extraction",
                &["reparse"],
                2,
                "content_piece",
                1,
                "writer",
            ),
            row("image_generation", &["images"], 5, "image", 1, "writer"),
            row("linking", &[], 8, "content_piece", 1, "linker"),
            row("optimization", &[], 1, "word", 200, "optimizer"),
            row(
                "site_structure_generation",
                &[],
                50,
                "site_blueprint",
                1,
                "site_builder",
            ),
            row("site_page_generation", &[], 20, "page", 1, "site_builder"),
        ])
        .expect("the built-in cost table is valid")
    }

    /// Validates rows: names and aliases unique and lowercase snake_case,
    /// credits from 1 to 1,000,000, unit_size from 1 to 1,000,000.
    pub fn new(rows: Vec<OperationCost>) -> Result<Self, String> {
        if rows.is_empty() {
            return Err("the cost table has no operations".into());
        }
        let mut by_name = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            let op = &row.operation;
            if !(1..=1_000_000).contains(&row.credits) {
                return Err(format!(
                    "{op}: credits must be from 1 to 1000000, got {}",
                    row.credits
                ));
            }
            if !(1..=1_000_000).contains(&row.unit_size) {
                return Err(format!(
                    "{op}: unit_size must be from 1 to 1000000, got {}",
                    row.unit_size
                ));
            }
            for field in [&row.unit, &row.module] {
                if field.trim().is_empty() {
                    return Err(format!("{op}: unit and module must not be empty"));
                }
            }
            for name in std::iter::once(op).chain(&row.aliases) {
                if !is_name(name) {
                    return Err(format!(
                        "{name:?}: names must be lowercase letters, digits and _"
                    ));
                }
                if by_name.insert(name.clone(), i).is_some() {
                    return Err(format!("{name:?} appears twice in the cost table"));
                }
            }
        }
        Ok(Self { rows, by_name })
    }

    /// Loads a table from a `.toml` or `.json` file with an `operation`
    /// array (see `docs/cost-table.example.toml`).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read cost table {}: {e}", path.display()))?;
        let parsed: TableFile = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| e.to_string()),
            Some("json") => serde_json::from_str(&text).map_err(|e| e.to_string()),
            _ => Err("the file name must end in .toml or .json".to_owned()),
        }
        .map_err(|e| format!("invalid cost table {}: {e}", path.display()))?;
        Self::new(parsed.operation)
            .map_err(|e| format!("invalid cost table {}: {e}", path.display()))
    }

    /// Every row, in table order.
    pub fn rows(&self) -> &[OperationCost] {
        &self.rows
    }

    /// The row for a canonical name or alias (case and surrounding spaces
    /// ignored).
    pub fn resolve(&self, operation: &str) -> Result<&OperationCost, PriceError> {
        let key = operation.trim().to_ascii_lowercase();
        self.by_name
            .get(&key)
            .map(|i| &self.rows[*i])
            .ok_or_else(|| PriceError::UnknownOperation {
                operation: operation.chars().take(64).collect(),
                known: self.rows.iter().map(|r| r.operation.clone()).collect(),
            })
    }

    /// Prices `quantity` of `operation` with checked arithmetic.
    pub fn price(&self, operation: &str, quantity: u64) -> Result<Price<'_>, PriceError> {
        let cost = self.resolve(operation)?;
        if quantity > MAX_QUANTITY {
            return Err(PriceError::QuantityTooLarge(quantity));
        }
        let quantity = if quantity == 0 {
            cost.unit_size
        } else {
            quantity
        };
        let credits = (cost.credits as u64)
            .checked_mul(quantity)
            .map(|total| (total / cost.unit_size).max(1))
            .and_then(|c| i64::try_from(c).ok())
            .ok_or(PriceError::QuantityTooLarge(quantity))?;
        Ok(Price {
            cost,
            quantity,
            credits,
        })
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn every_row_of_the_spec_table() {
        let t = CostTable::builtin();
        // (operation, quantity, expected credits, canonical)
        let cases: &[(&str, u64, i64, &str)] = &[
            ("clustering", 0, 10, "clustering"),
            ("clustering", 3, 30, "clustering"),
            ("idea_generation", 1, 15, "idea_generation"),
            ("ideas", 2, 30, "idea_generation"),
            ("content_generation", 0, 1, "content_generation"),
            ("content", 50, 1, "content_generation"),
            ("content", 100, 1, "content_generation"),
            ("content", 250, 2, "content_generation"),
            ("content", 1000, 10, "content_generation"),
            ("image_prompt_extraction", 1, 2, "image_prompt_extraction"),
            ("reparse", 4, 8, "image_prompt_extraction"),
            ("image_generation", 0, 5, "image_generation"),
            ("images", 3, 15, "image_generation"),
            ("linking", 2, 16, "linking"),
            ("optimization", 1000, 5, "optimization"),
            ("optimization", 0, 1, "optimization"),
            ("optimization", 199, 1, "optimization"),
            (
                "site_structure_generation",
                1,
                50,
                "site_structure_generation",
            ),
            ("site_page_generation", 5, 100, "site_page_generation"),
        ];
        for (op, q, credits, canonical) in cases {
            let p = t.price(op, *q).unwrap();
            assert_eq!(p.credits, *credits, "{op} × {q}");
            assert_eq!(p.cost.operation, *canonical);
        }
    }

    #[test]
    fn the_example_file_is_the_builtin_table() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/cost-table.example.toml");
        let example = CostTable::from_file(&path).unwrap();
        assert_eq!(example.rows(), CostTable::builtin().rows());
    }

    #[test]
    fn modules_follow_the_spec() {
        let t = CostTable::builtin();
        for (op, module) in [
            ("clustering", "planner"),
            ("idea_generation", "planner"),
            ("content_generation", "writer"),
            ("image_prompt_extraction", "writer"),
            ("image_generation", "writer"),
            ("linking", "linker"),
            ("optimization", "optimizer"),
            ("site_structure_generation", "site_builder"),
            ("site_page_generation", "site_builder"),
        ] {
            assert_eq!(t.resolve(op).unwrap().module, module);
        }
    }

    #[test]
    fn unknown_operations_list_the_known_ones() {
        let err = CostTable::builtin().price("keyword_magic", 1).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("keyword_magic") && msg.contains("clustering, idea_generation"),
            "{msg}"
        );
    }

    #[test]
    fn quantities_over_a_billion_are_refused() {
        let t = CostTable::builtin();
        assert!(t.price("clustering", MAX_QUANTITY).is_ok());
        assert_eq!(
            t.price("clustering", MAX_QUANTITY + 1),
            Err(PriceError::QuantityTooLarge(MAX_QUANTITY + 1))
        );
        assert!(t.price("clustering", u64::MAX).is_err());
    }

    #[test]
    fn tables_load_from_toml_and_json_and_bad_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("t.toml");
        std::fs::write(
            &toml_path,
            "[[operation]]\nname = \"clustering\"\ncredits = 12\nunit = \"request\"\nmodule = \"planner\"\n",
        )
        .unwrap();
        let t = CostTable::from_file(&toml_path).unwrap();
        assert_eq!(t.price("clustering", 0).unwrap().credits, 12);

        let json_path = dir.path().join("t.json");
        std::fs::write(
            &json_path,
            r#"{"operation":[{"name":"content_generation","aliases":["content"],"credits":2,"unit":"word","unit_size":100,"module":"writer"}]}"#,
        )
        .unwrap();
        assert_eq!(
            CostTable::from_file(&json_path)
                .unwrap()
                .price("content", 250)
                .unwrap()
                .credits,
            5
        );

        for (body, needle) in [
            (
                "[[operation]]\nname = \"x\"\ncredits = 0\nunit = \"request\"\nmodule = \"m\"\n",
                "credits",
            ),
            (
                "[[operation]]\nname = \"Bad Name\"\ncredits = 1\nunit = \"request\"\nmodule = \"m\"\n",
                "lowercase",
            ),
            (
                "[[operation]]\nname = \"x\"\ncredits = 1\nunit = \"request\"\nmodule = \"m\"\ncolour = 1\n",
                "unknown field",
            ),
            ("operation = []\n", "no operations"),
        ] {
            std::fs::write(&toml_path, body).unwrap();
            let err = CostTable::from_file(&toml_path).unwrap_err();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    proptest! {
        /// Count-priced operations cost credits × quantity; 0 means 1.
        #[test]
        fn count_priced_is_a_product(q in 0u64..=MAX_QUANTITY) {
            let t = CostTable::builtin();
            for row in t.rows().iter().filter(|r| r.unit_size == 1) {
                let p = t.price(&row.operation, q).unwrap();
                prop_assert_eq!(p.credits as u64, row.credits as u64 * q.max(1));
            }
        }

        /// Word-priced operations: floor with a minimum of one credit, never
        /// decreasing in the word count, and the base cost for 0 words.
        #[test]
        fn word_priced_floors_with_a_minimum(w in 0u64..=MAX_QUANTITY, extra in 0u64..10_000) {
            let t = CostTable::builtin();
            for row in t.rows().iter().filter(|r| r.unit == "word") {
                let p = t.price(&row.operation, w).unwrap();
                let expected = if w == 0 { row.credits as u64 } else {
                    (row.credits as u64 * w / row.unit_size).max(1)
                };
                prop_assert_eq!(p.credits as u64, expected);
                prop_assert!(p.credits >= 1);
                let more = (w + extra).min(MAX_QUANTITY);
                if w > 0 {
                    prop_assert!(t.price(&row.operation, more).unwrap().credits >= p.credits);
                }
            }
        }

        /// Aliases always price exactly like their canonical operation.
        #[test]
        fn aliases_price_like_canonical(q in 0u64..=MAX_QUANTITY) {
            let t = CostTable::builtin();
            for row in t.rows() {
                for alias in &row.aliases {
                    prop_assert_eq!(t.price(alias, q).unwrap(), t.price(&row.operation, q).unwrap());
                }
            }
        }
    }
}

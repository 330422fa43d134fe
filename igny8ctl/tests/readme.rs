//! The README, walked as a newcomer walks it: every fenced `sh` block
//! marked `<!-- readme-walk -->` runs, in order, in one bash session,
//! against `igny8ctl dev` started in an empty directory (a fresh SQLite
//! file). Also: every relative Markdown link in the repository resolves, and
//! the docs use one spelling for commands and tokens.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::{IGNY8CTL, launcher::Launcher, run};

/// The marker line that makes the next fenced `sh` block runnable.
const MARKER: &str = "<!-- readme-walk -->";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("read README.md")
}

/// A fenced block: its info string, first line number and text.
struct Fence {
    info: String,
    line: usize,
    text: String,
    marked: bool,
}

/// Every fenced code block of `markdown`, noting which follow the marker.
fn fences(markdown: &str) -> Vec<Fence> {
    let mut out = Vec::new();
    let mut lines = markdown.lines().enumerate();
    let mut marked = false;
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim();
        if trimmed == MARKER {
            marked = true;
            continue;
        }
        if let Some(info) = trimmed.strip_prefix("```") {
            let mut text = String::new();
            for (_, body) in lines.by_ref() {
                if body.trim() == "```" {
                    break;
                }
                text.push_str(body);
                text.push('\n');
            }
            out.push(Fence {
                info: info.trim().to_owned(),
                line: n + 1,
                text,
                marked,
            });
            marked = false;
        } else if !trimmed.is_empty() {
            assert!(
                !marked,
                "README line {}: {MARKER} must be followed by a ```sh fence",
                n + 1
            );
        }
    }
    out
}

/// The bash prelude: `cargo run -q -p igny8ctl -- ARGS` runs the binary
/// cargo built for this test (a nested `cargo run` would wait on the build
/// lock this test's cargo holds); any other cargo line is refused.
fn prelude() -> String {
    format!(
        r#"set -euo pipefail
cargo() {{
    if [ "$#" -ge 5 ] && [ "$1 $2 $3 $4 $5" = "run -q -p igny8ctl --" ]; then
        shift 5
        {IGNY8CTL:?} "$@"
    else
        echo "README walk: this test only runs 'cargo run -q -p igny8ctl -- …', not: cargo $*" >&2
        return 127
    fi
}}
"#
    )
}

#[test]
fn the_readme_walks_from_a_fresh_launcher() {
    let readme = readme();
    let blocks: Vec<Fence> = fences(&readme).into_iter().filter(|f| f.marked).collect();
    assert!(
        blocks.len() >= 5,
        "expected the README's walk-through blocks, found {}",
        blocks.len()
    );
    for b in &blocks {
        assert_eq!(
            b.info, "sh",
            "README line {}: walked blocks are ```sh",
            b.line
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let launcher = Launcher::start(dir.path(), &[]);
    let grpcurl = igny8_tests::grpcurl();
    let path = format!(
        "{}:{}",
        grpcurl.parent().expect("grpcurl dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut script = prelude();
    for (i, b) in blocks.iter().enumerate() {
        let text = b
            .text
            .replace(":50051", &format!(":{}", launcher.billing.port()))
            .replace(":50052", &format!(":{}", launcher.settings.port()));
        script.push_str(&format!(
            "echo '=== README block {} (line {})'\n{text}",
            i + 1,
            b.line
        ));
    }
    script.push_str("echo '=== README walk done'\n");

    let walk = || {
        run(Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", &path)
            .env("HOME", dir.path())
            .env("RUST_LOG", "warn"))
    };
    let out = walk();
    let last_block = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("=== README "))
        .unwrap_or("(none started)");
    assert!(
        out.code == Some(0) && out.stdout.contains("=== README walk done"),
        "a README block failed; the last one started: {last_block}\n\
         stdout:\n{}\nstderr:\n{}\nlauncher stderr:\n{}",
        out.stdout,
        out.stderr,
        launcher.stderr()
    );
    for stream in [&out.stdout, &out.stderr] {
        assert!(
            !stream.contains("ERROR:") && !stream.contains("Code: "),
            "a README block printed an error status:\nstdout:\n{}\nstderr:\n{}",
            out.stdout,
            out.stderr
        );
    }

    // What the walk promises a newcomer: a Deduct, a module switched off and
    // seen off, an operator grant, a service grant.
    let stdout = &out.stdout;
    for needle in [
        r#""sufficient": false"#,
        r#""operation": "clustering""#,
        r#""replayed": false"#,
        r#""writer_enabled": false"#,
        r#""enabled": false"#,
        "granted 500 credits to account 1",
        r#""actor": "service:support-tool""#,
        r#""state": "HOLD_STATE_CAPTURED""#,
        r#""captured_credits": "25""#,
        r#""held": "0""#,
    ] {
        assert!(
            stdout.contains(needle),
            "{needle} in the walk's output:\n{stdout}"
        );
    }
    // 1000 − 10 (clustering deduct) + 500 (operator) + 100 (service)
    // − 25 (the captured part of the 40-credit hold).
    let balance = run(common::igny8ctl(dir.path()).args(["balance", "--account", "1"]));
    assert!(
        balance.ok().contains("1565 credits"),
        "{balance:#?}\nwalk output:\n{stdout}"
    );

    // Walking it again on the same data replays instead of charging twice.
    let again = walk();
    assert_eq!(again.code, Some(0), "second walk: {again:#?}");
    assert!(again.stdout.contains(r#""replayed": true"#), "{again:#?}");
    let balance = run(common::igny8ctl(dir.path()).args(["balance", "--account", "1"]));
    assert!(balance.ok().contains("1565 credits"), "{balance:#?}");

    let (status, stderr) = launcher.stop("TERM");
    assert!(status.success(), "{status}\n{stderr}");
}

/// Markdown files of the repository (not build output or dependencies).
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | ".git" | "node_modules") {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// The targets of inline links `[text](target)` in `markdown`, outside code.
fn links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

/// GitHub's anchor for a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn every_markdown_link_resolves_inside_the_repository() {
    let mut files = Vec::new();
    markdown_files(&repo(), &mut files);
    assert!(files.len() >= 4, "{files:?}");
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read markdown");
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("parent").join(path)
            };
            let inside = resolved
                .canonicalize()
                .map(|p| p.starts_with(repo().canonicalize().unwrap()))
                .unwrap_or(false);
            if !inside {
                broken.push(format!("{}: {target}", file.display()));
                continue;
            }
            if !fragment.is_empty() && resolved.extension().is_some_and(|e| e == "md") {
                let doc = std::fs::read_to_string(&resolved).expect("read link target");
                if !anchors(&doc).iter().any(|a| a == fragment) {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links that do not resolve:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_docs_use_one_spelling_for_commands_and_tokens() {
    let mut problems = Vec::new();
    for doc in [
        "README.md",
        "deploy/README.md",
        "docs/api.md",
        "bench/README.md",
    ] {
        let text = std::fs::read_to_string(repo().join(doc)).expect("read doc");
        for name in ["$TOKEN", "$SERVICE_TOKEN", "${TOKEN}"] {
            if text.contains(name) {
                problems.push(format!(
                    "{doc}: uses {name}; the docs say $IGNY8_TOKEN / $IGNY8_SERVICE_TOKEN"
                ));
            }
        }
        for fence in fences(&text).iter().filter(|f| f.info == "sh") {
            for line in fence.text.lines().map(str::trim) {
                if line.starts_with("igny8ctl ")
                    || line.starts_with("billing-svc ")
                    || line.starts_with("settings-svc ")
                {
                    problems.push(format!(
                        "{doc} line {}: `{line}` is not on PATH after the README's commands; write `cargo run -q -p … -- …`",
                        fence.line
                    ));
                }
                // A call to a method can answer false or 0: grpcurl would hide it.
                if line.starts_with("grpcurl ")
                    && line.contains("-H ")
                    && !line.contains("-emit-defaults")
                    && !line.contains(" list")
                    && !line.contains(" describe")
                {
                    problems.push(format!(
                        "{doc} line {}: `{line}` needs -emit-defaults",
                        fence.line
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

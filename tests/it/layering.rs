//! The layering rule, checked on the source: the payment core and the protocol flows know no
//! HTTP face (no `axum`, no `StatusCode`, no `crate::api`, not the application state that holds
//! every protocol), and the core knows no protocol. Dependencies point from faces to core.
//! Also: the README's table of failure kinds and HTTP statuses is the HTTP face's table.

use std::path::{Path, PathBuf};

use spendcap::outcome::Kind;

/// The core: what every payment shares, whatever its protocol or face.
const CORE: [&str; 8] = [
    "src/pay.rs",
    "src/outcome.rs",
    "src/ledger",
    "src/receipt.rs",
    "src/report.rs",
    "src/alerts.rs",
    "src/unacked.rs",
    "src/fingerprint.rs",
];

/// The protocol flows: money logic per protocol, over the core and their own service.
const FLOWS: [&str; 12] = [
    "src/protocols/x402/purchase.rs",
    "src/protocols/x402/upstream.rs",
    "src/protocols/acp/checkout.rs",
    "src/protocols/acp/reply.rs",
    "src/protocols/ap2/checkout.rs",
    "src/protocols/ap2/cart.rs",
    "src/protocols/ap2/keys.rs",
    "src/protocols/ap2/budget.rs",
    "src/protocols/mpp/flow.rs",
    "src/protocols/mcp_upstream.rs",
    "src/protocols/api/flow.rs",
    "src/protocols/mpp/session.rs",
];

/// What neither the core nor a flow may name: the HTTP face, and the state that holds every
/// protocol (handing it into a flow rebuilds the circle).
const FACE: [&str; 5] = ["axum", "crate::api", "AppState", "SharedState", "http::StatusCode"];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        let path = entry.expect("a directory entry").path();
        files.extend(rust_files(&path).into_iter().filter(|p| p.extension().is_some_and(|e| e == "rs")));
    }
    files
}

/// `path:line: text` for every line of code (comments aside) that names one of `words`.
fn hits(paths: &[&str], words: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for path in paths {
        let files = rust_files(&root.join(path));
        assert!(!files.is_empty(), "{path} has no Rust files");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("readable source");
            for (number, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if words.iter().any(|word| code.contains(word)) {
                    let name = file.strip_prefix(root).unwrap_or(&file).display().to_string();
                    found.push(format!("{name}:{}: {}", number + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn the_core_and_the_flows_know_no_http_face() {
    let found = hits(&CORE, &FACE);
    assert!(found.is_empty(), "the core names a face:\n{}", found.join("\n"));
    let found = hits(&FLOWS, &FACE);
    assert!(found.is_empty(), "a protocol flow names a face:\n{}", found.join("\n"));
    // A flow reads a provider's HTTP status (an upstream answer), never decides its own: only
    // the x402 upstream client names the type, and it is reqwest's, not the face's.
    let found =
        hits(&FLOWS[..1], &["StatusCode"]).into_iter().chain(hits(&FLOWS[2..], &["StatusCode"])).collect::<Vec<_>>();
    assert!(found.is_empty(), "a flow builds a status code:\n{}", found.join("\n"));
}

#[test]
fn the_core_knows_no_protocol() {
    let found = hits(&CORE, &["crate::protocols", "crate::app::AppState", "crate::mcp"]);
    assert!(found.is_empty(), "the core depends on a flow or a face:\n{}", found.join("\n"));
}

/// The README's "Failure kinds and HTTP statuses" table: `| kind | status | ... |` rows.
fn readme_table() -> Vec<(String, u16)> {
    let readme = include_str!("../../README.md");
    let at = readme.find("<!-- failure-kinds -->").expect("README has the failure-kinds table");
    readme[at..]
        .lines()
        .skip(1)
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|row| {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`')).collect();
            (cells[0].to_owned(), cells[1].parse().unwrap_or_else(|_| panic!("a status in {row}")))
        })
        .collect()
}

#[test]
fn the_readme_status_table_is_the_http_faces_table() {
    let documented = readme_table();
    let table: Vec<(String, u16)> =
        spendcap::api::status::TABLE.iter().map(|(kind, status)| (kind.as_str().to_owned(), status.as_u16())).collect();
    assert_eq!(documented, table, "README rows (left) and api::status::TABLE (right) differ");
    for kind in Kind::ALL {
        assert_eq!(
            spendcap::api::status::of(kind).as_u16(),
            table.iter().find(|(k, _)| k == kind.as_str()).expect("listed").1
        );
    }
}

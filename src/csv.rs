//! CSV cells, written in one place for every export (`/v1/log?format=csv`, `/v1/reports?format=csv`
//! and the CLI, which prints what those send).
//!
//! Cells carry text agents chose (service, task, task type), and a spreadsheet reads a cell that
//! starts with `=`, `+`, `-`, `@`, a tab or a carriage return as a formula. Such a cell is
//! neutralised as OWASP's CSV-injection rule says: prefixed with a single quote and quoted, so it
//! reads as the text it was (with a leading `'`).

/// Appends `value` as one RFC 4180 cell: quoted when it holds a comma, quote or line break,
/// neutralised when it could be read as a formula.
pub fn push_cell(out: &mut String, value: &str) {
    let formula = value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula || value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        if formula {
            out.push('\'');
        }
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// One CSV row of `cells`, ending in a newline.
pub fn push_row<S: AsRef<str>>(out: &mut String, cells: &[S]) {
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_cell(out, cell.as_ref());
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(value: &str) -> String {
        let mut out = String::new();
        push_cell(&mut out, value);
        out
    }

    #[test]
    fn formula_cells_are_neutralised_and_the_rest_quoted_as_rfc_4180() {
        assert_eq!(cell("=HYPERLINK(\"http://x\")"), "\"'=HYPERLINK(\"\"http://x\"\")\"");
        assert_eq!(cell("+1+1"), "\"'+1+1\"");
        assert_eq!(cell("-2+3"), "\"'-2+3\"");
        assert_eq!(cell("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(cell("\tcmd"), "\"'\tcmd\"");
        assert_eq!(cell("\rcmd"), "\"'\rcmd\"");
        assert_eq!(cell("api.openai.com"), "api.openai.com");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("1=1"), "1=1");
        assert_eq!(cell(""), "");
        let mut row = String::new();
        push_row(&mut row, &["x", "=1", "y"]);
        assert_eq!(row, "x,\"'=1\",y\n");
    }
}

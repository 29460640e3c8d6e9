//! What an insider with write access to the audit log (and no audit key) can do to
//! it: rewrite records and recompute every `hash` and `prev_hash` so that the chain
//! holds again. The transparency tests check that signed checkpoints still catch it.

use std::path::Path;

/// The log's lines, each with its line feed (a final fragment without one last).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read the audit log")
        .split_inclusive('\n')
        .map(String::from)
        .collect()
}

/// Renumbers `seq` from 1 and recomputes `prev_hash` and `hash` over each line's
/// exact bytes, as the module docs of `meshca::audit` describe the hash rule.
pub fn rechain(lines: &[String]) -> String {
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let rest =
            &line[line.find(",\"time\":").expect("a record")..line.rfind(",\"hash\":").expect("a hash")];
        let body = format!("{{\"seq\":{},\"prev_hash\":\"{prev}\"{rest}}}", i + 1);
        let hash = meshca::audit::sha256_hex(body.as_bytes());
        out.push_str(&format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]));
        prev = hash;
    }
    out
}

/// Rewrites the log at `path` through `edit`, then recomputes its chain.
pub fn forge(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let mut lines = lines(path);
    edit(&mut lines);
    std::fs::write(path, rechain(&lines)).expect("write the forged log");
}

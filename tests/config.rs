//! Config checking as a user meets it: `m3u-edge -t -c FILE` says ok or names
//! file, line, column and key path for every mistake; a bad config never starts.

use crate::support::edge::{check_config, run_bin};

fn errors(yaml: &str) -> String {
    let out = check_config(yaml);
    assert!(!out.status.success(), "accepted:\n{yaml}");
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

#[test]
fn the_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/m3u-edge.yaml");
    let out = run_bin(&["-t", "-c", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn mistakes_name_line_column_and_key() {
    let cases: [(&str, &str, &str); 7] = [
        ("server:\n  listn: \"127.0.0.1:1\"\n", ":2:", "server.listn"),
        (
            "streams:\n  - url: \"http://h/a.ts\"\n  - url: \"http://h/b.ts\"\n    failover_url: []\n",
            ":4:",
            "streams[1].failover_url",
        ),
        ("upstream:\n  connect_timeout: \"3 parsecs\"\n", ":2:", "upstream.connect_timeout"),
        ("streams:\n  - url: \"ftp://h/a.ts\"\n", ":2:", "streams[0].url"),
        ("server:\n  listen: \"nowhere\"\n", ":2:", "server.listen"),
        ("providers:\n  - name: p\n    hosts: [\"h\"]\n    max_connections: \"many\"\n", ":4:", "providers[0].max_connections"),
        ("streams:\n  - url: \"http://h/a.ts\"\n    provider: ghost\n", ":3:", "streams[0].provider"),
    ];
    for (yaml, at, key) in cases {
        let err = errors(yaml);
        assert!(
            err.contains("config.yaml"),
            "no file name for:\n{yaml}\n{err}"
        );
        assert!(err.contains(at), "no line {at} for:\n{yaml}\n{err}");
        assert!(err.contains(key), "no key {key} for:\n{yaml}\n{err}");
    }
}

#[test]
fn a_bad_config_does_not_start() {
    let out = run_bin(&["-c", "/nonexistent/m3u-edge.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/m3u-edge.yaml"));
}

use std::collections::BTreeSet;

use super::*;
use proptest::prelude::*;

const MINIMAL: &str = r#"
[source]
brokers = "127.0.0.1:9092"
topics = ["purchases"]

[[aggregation]]
name = "per_user"
plugin = "count.wasm"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "wagg.toml", Path::new("/etc/wagg"))
}

fn error(text: &str) -> String {
    parse(text)
        .expect_err("config must be rejected")
        .to_string()
}

#[test]
fn minimal_config_gets_sane_defaults() {
    let config = parse(MINIMAL).expect("valid");
    assert_eq!(config.source.group_id, "wagg");
    assert_eq!(config.http.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.batch.max_records, 1000);
    assert_eq!(config.batch.max_delay_ms, 100);
    assert_eq!(config.state_dir(), Path::new("/etc/wagg/wagg-state"));
    let aggregation = &config.aggregations[0];
    assert_eq!(
        config.plugin_path(aggregation),
        Path::new("/etc/wagg/count.wasm")
    );
    assert_eq!(aggregation.on_error, OnError::Fail);
    assert_eq!(aggregation.params_json(), "{}");
    assert!(aggregation.applies_to("anything"));
    assert_eq!(config.plugins.memory_limit_mib, 64);
}

#[test]
fn full_config_parses() {
    let config = parse(
        r#"
[source]
brokers = "a:1,b:2"
group_id = "g"
topics = ["t1", "t2"]
start_from = "latest"
[source.kafka]
"fetch.min.bytes" = 1
"client.id" = "me"
"check.crcs" = true

[state]
dir = "/var/lib/wagg"
sync_writes = true

[http]
listen = "0.0.0.0:9000"

[batch]
max_records = 500
max_delay_ms = 20

[plugins]
memory_limit_mib = 32
call_timeout_ms = 250

[[aggregation]]
name = "spend"
plugin = "stats.wasm"
topic = "t2"
key = "/user"
on_error = "skip"
params = { field = "/amount" }
"#,
    )
    .expect("valid");
    assert_eq!(config.source.start_from, StartFrom::Latest);
    let props: Vec<_> = config.kafka_properties().collect();
    assert_eq!(
        props,
        vec![
            ("check.crcs", "true".into()),
            ("client.id", "me".into()),
            ("fetch.min.bytes", "1".into())
        ]
    );
    assert_eq!(config.state_dir(), Path::new("/var/lib/wagg"));
    let aggregation = &config.aggregations[0];
    assert_eq!(aggregation.params_json(), r#"{"field":"/amount"}"#);
    assert!(aggregation.applies_to("t2") && !aggregation.applies_to("t1"));
    assert_eq!(config.plugins.call_timeout_ms, 250);
}

#[test]
fn errors_name_the_file_and_the_field() {
    let unknown = error(&MINIMAL.replace("topics =", "topix = [\"x\"]\ntopics ="));
    assert!(unknown.starts_with("wagg.toml: "), "{unknown}");
    assert!(unknown.contains("unknown field `topix`"), "{unknown}");

    let wrong_type = error(&format!("{MINIMAL}\n[batch]\nmax_records = \"many\"\n"));
    assert!(wrong_type.contains("(`max_records`)"), "{wrong_type}");

    let missing = error("[source]\ntopics = [\"t\"]\n");
    assert!(missing.contains("missing field `brokers`"), "{missing}");

    let bad_topic = error(&format!("{MINIMAL}topic = \"nope\"\n"));
    assert!(
        bad_topic.contains("`aggregation[0]`.topic \"nope\""),
        "{bad_topic}"
    );

    let bad_key = error(&format!("{MINIMAL}key = \"user\"\n"));
    assert!(
        bad_key.contains("`aggregation[0]`.key \"user\""),
        "{bad_key}"
    );

    let duplicate = error(&format!(
        "{MINIMAL}{}",
        &MINIMAL[MINIMAL.find("[[aggregation]]").unwrap()..]
    ));
    assert!(
        duplicate.contains("`aggregation[1]`.name \"per_user\" is used twice"),
        "{duplicate}"
    );

    let bad_name = error(&MINIMAL.replace("per_user", "per user/x"));
    assert!(bad_name.contains("`aggregation[0]`.name"), "{bad_name}");

    let reserved = error(&format!(
        "{MINIMAL}\n[source.kafka]\n\"group.id\" = \"x\"\n"
    ));
    assert!(
        reserved.contains("`source.kafka.\"group.id\"` is managed by wagg"),
        "{reserved}"
    );

    let no_aggregations = error("[source]\nbrokers = \"b:1\"\ntopics = [\"t\"]\n");
    assert!(
        no_aggregations.contains("no `[[aggregation]]`"),
        "{no_aggregations}"
    );
}

#[test]
fn secrets_never_appear_in_errors_or_debug_output() {
    let secret = "hunter2-very-secret";
    let with_secret = format!("{MINIMAL}\n[source.kafka]\n\"sasl.password\" = \"{secret}\"\n");
    let config = parse(&with_secret).expect("valid");
    assert!(!format!("{config:?}").contains(secret));

    // A malformed value on the secret's line.
    let broken = format!("{MINIMAL}\n[source.kafka]\n\"sasl.password\" = \"{secret}\n");
    let message = error(&broken);
    assert!(!message.contains(secret), "{message}");
    let nested = format!("{MINIMAL}\n[source.kafka]\n\"sasl.password\" = {{ x = \"{secret}\" }}\n");
    let message = error(&nested);
    assert!(!message.contains(secret), "{message}");
    assert!(message.contains("sasl.password"), "{message}");
}

#[test]
fn on_error_defaults_to_dead_letter_only_when_a_topic_is_configured() {
    let with_dlq = format!(
        "{MINIMAL}\n[[aggregation]]\nname = \"b\"\nplugin = \"x.wasm\"\non_error = \"skip\"\n\n[dead_letter]\ntopic = \"wagg-dlq\"\n[dead_letter.kafka]\n\"acks\" = \"all\"\n\"sasl.password\" = \"dlq-secret\"\n\n[source.kafka]\n\"sasl.username\" = \"me\"\n\"fetch.min.bytes\" = 1\n"
    );
    let config = parse(&with_dlq).expect("valid");
    assert_eq!(config.aggregations[0].on_error, OnError::DeadLetter);
    assert_eq!(config.aggregations[1].on_error, OnError::Skip);
    assert_eq!(
        config.dead_letter_properties(),
        vec![
            ("sasl.username", "me".to_owned()),
            ("acks", "all".to_owned()),
            ("sasl.password", "dlq-secret".to_owned()),
        ]
    );
    assert!(!format!("{config:?}").contains("dlq-secret"));

    let without = error(&format!("{MINIMAL}on_error = \"dead-letter\"\n"));
    assert!(
        without.contains("`aggregation[0]`.on_error = \"dead-letter\"")
            && without.contains("`[dead_letter]`"),
        "{without}"
    );
    let looping = error(&format!(
        "{MINIMAL}\n[dead_letter]\ntopic = \"purchases\"\n"
    ));
    assert!(
        looping.contains("`dead_letter.topic` \"purchases\" is also in `source.topics`"),
        "{looping}"
    );
    let unknown_policy = error(&format!("{MINIMAL}on_error = \"retry\"\n"));
    assert!(unknown_policy.contains("(`on_error`)"), "{unknown_policy}");
}

/// Fields of MINIMAL-plus-sections and a value of the wrong type for each.
const TYPED_FIELDS: &[(&str, &str, &str)] = &[
    ("source", "brokers", "1"),
    ("source", "group_id", "[]"),
    ("source", "topics", "\"t\""),
    ("source", "start_from", "\"middle\""),
    ("state", "dir", "3"),
    ("state", "cache_entries", "-1"),
    ("state", "block_cache_mib", "\"big\""),
    ("state", "sync_writes", "\"yes\""),
    ("http", "listen", "\"localhost\""),
    ("http", "max_page", "0.5"),
    ("batch", "max_records", "\"many\""),
    ("batch", "max_delay_ms", "-5"),
    ("plugins", "memory_limit_mib", "true"),
    ("plugins", "call_timeout_ms", "{}"),
    ("plugins", "max_state_bytes", "[1]"),
    ("dead_letter", "topic", "7"),
];

proptest! {
    /// A wrong value for any field is refused with an error that names it.
    #[test]
    fn every_rejected_field_is_named(index in 0..TYPED_FIELDS.len()) {
        let (section, field, bad) = TYPED_FIELDS[index];
        let text = if section == "source" {
            MINIMAL.replacen("[source]\n", &format!("[source]\n{field} = {bad}\n"), 1)
                .replacen(&format!("\n{field} = \"127.0.0.1:9092\""), "\n", 1)
                .replacen(&format!("\n{field} = [\"purchases\"]"), "\n", 1)
        } else {
            format!("{MINIMAL}\n[{section}]\n{field} = {bad}\n")
        };
        let message = error(&text);
        prop_assert!(message.contains(field), "{text}\n=> {message}");
    }

    /// Arbitrary text never panics the parser, and a rejection always says
    /// which file it is about.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        if let Err(e) = parse(&text) {
            prop_assert!(e.to_string().starts_with("wagg.toml: "));
        }
    }

    /// Mutating a valid config (deleting or duplicating a span) never panics.
    #[test]
    fn mutated_configs_never_panic(start in 0usize..200, len in 0usize..40, dup in any::<bool>()) {
        let start = start.min(MINIMAL.len());
        let end = (start + len).min(MINIMAL.len());
        if MINIMAL.is_char_boundary(start) && MINIMAL.is_char_boundary(end) {
            let mutated = if dup {
                format!("{}{}", &MINIMAL[..end], &MINIMAL[start..])
            } else {
                format!("{}{}", &MINIMAL[..start], &MINIMAL[end..])
            };
            let _ = parse(&mutated);
        }
    }
}

#[test]
fn http_auth_takes_the_token_from_exactly_one_place() {
    let both = error(&format!(
        "{MINIMAL}\n[http.auth]\ntoken_env = \"X\"\ntoken_file = \"t\"\n"
    ));
    assert!(both.contains("exactly one of `token_env`"), "{both}");
    let neither = error(&format!("{MINIMAL}\n[http.auth]\nscope = \"admin\"\n"));
    assert!(neither.contains("exactly one of `token_env`"), "{neither}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "  0123456789abcdef-secret\n").unwrap();
    let config = Config::parse(
        &format!("{MINIMAL}\n[http.auth]\ntoken_file = \"token\"\nscope = \"admin\"\n"),
        "wagg.toml",
        dir.path(),
    )
    .expect("valid");
    assert_eq!(config.http.auth.as_ref().unwrap().scope, AuthScope::Admin);
    assert_eq!(
        config.http_token().unwrap().as_deref(),
        Some("0123456789abcdef-secret")
    );
    assert!(!format!("{config:?}").contains("secret"));

    std::fs::write(dir.path().join("token"), "short").unwrap();
    let message = config.http_token().unwrap_err();
    assert!(message.contains("at least 16 characters"), "{message}");
    assert!(!message.contains("short"), "{message}");

    let missing = parse(&format!(
        "{MINIMAL}\n[http.auth]\ntoken_env = \"WAGG_TEST_SURELY_UNSET_VARIABLE\"\n"
    ))
    .unwrap()
    .http_token()
    .unwrap_err();
    assert!(
        missing.contains("WAGG_TEST_SURELY_UNSET_VARIABLE is not set"),
        "{missing}"
    );
}

/// The README's config reference is a valid config, so it cannot drift from
/// the parser.
#[test]
fn the_readme_config_reference_parses() {
    let readme = include_str!("../../../README.md");
    let section = &readme[readme.find("## Config reference").expect("section")..];
    let start = section.find("```toml\n").expect("toml block") + "```toml\n".len();
    let block = &section[start..start + section[start..].find("```").expect("block end")];
    let config = parse(block).unwrap_or_else(|e| panic!("README config: {e}"));
    assert_eq!(config.aggregations[0].on_error, OnError::DeadLetter);
    assert_eq!(config.shutdown.deadline_ms, 10_000);
    assert_eq!(
        config.http.auth.as_ref().map(|a| a.scope),
        Some(AuthScope::All)
    );
}

/// `docs/config.md` lists every field with its default. The fields are
/// those its complete examples set (each must parse); the defaults are
/// what the parser fills in for a minimal file.
#[test]
fn the_config_reference_lists_every_field_with_its_real_default() {
    let doc = include_str!("../../../docs/config.md");
    // Rows: | `path` | default | meaning |
    let mut rows = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 4
            && let Some(path) = cells[1].strip_prefix('`').and_then(|c| c.strip_suffix('`'))
            && path.contains('.')
            && !path.contains(' ')
        {
            rows.insert(path.to_owned(), cells[2].to_owned());
        }
    }

    // Every field the complete examples set (union over the doc's configs).
    let mut documented = BTreeSet::new();
    let mut rest = doc;
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + "```toml\n".len()..];
        let end = body.find("```").expect("block end");
        let config = parse(&body[..end]).unwrap_or_else(|e| panic!("docs/config.md: {e}"));
        documented.extend(field_paths(&config).into_keys());
        rest = &body[end..];
    }
    let listed: BTreeSet<String> = rows.keys().cloned().collect();
    assert_eq!(
        listed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "listed in docs/config.md but set by none of its examples"
    );
    assert_eq!(
        documented.difference(&listed).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "set by an example but missing from the tables"
    );

    // Defaults: what a minimal config gets; the required fields are the
    // ones the minimal config has to give.
    let given = field_paths(&parse(MINIMAL).expect("valid"));
    let required = [
        "source.brokers",
        "source.topics",
        "aggregation.name",
        "aggregation.plugin",
    ];
    for (path, value) in &given {
        let cell = &rows[path];
        if required.contains(&path.as_str()) {
            assert_eq!(cell, "required", "{path}");
        } else {
            assert_eq!(cell, &format!("`{value}`"), "default of {path}");
        }
    }
    for (path, cell) in &rows {
        if !given.contains_key(path) {
            let lone_value =
                cell.starts_with('`') && cell.ends_with('`') && cell.matches('`').count() == 2;
            assert!(
                !lone_value,
                "{path}: documented default {cell}, but a minimal config has none"
            );
        }
    }
}

/// `section.field` → value as TOML, for every field set in `config`
/// (`kafka` and `params` tables count as one field; for `[[aggregation]]`,
/// the fields of any of them).
fn field_paths(config: &Config) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table)
                if !(prefix.ends_with(".kafka") || prefix.ends_with(".params")) =>
            {
                for (key, value) in table {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, out);
                }
                if !prefix.is_empty() && prefix.contains('.') {
                    out.entry(prefix.to_owned()).or_insert_with(|| "{…}".into());
                }
            }
            toml::Value::Array(items) if prefix == "aggregation" => {
                for item in items {
                    walk(prefix, item, out);
                }
            }
            toml::Value::Table(table) if table.is_empty() => {
                out.insert(prefix.to_owned(), "{}".into());
            }
            other => {
                out.entry(prefix.to_owned())
                    .or_insert_with(|| other.to_string());
            }
        }
    }
    let value = toml::Value::try_from(config).expect("a config serializes");
    let mut out = BTreeMap::new();
    walk("", &value, &mut out);
    out
}

/// A config with `kafka` under `[source.kafka]` and `extra` at the end.
fn with_source_kafka(kafka: &str, extra: &str) -> String {
    format!(
        "[source]\nbrokers = \"b:1\"\ntopics = [\"t\"]\n\n[source.kafka]\n{kafka}\n\n[[aggregation]]\nname = \"a\"\nplugin = \"count.wasm\"\n{extra}"
    )
}

#[test]
fn a_changelog_record_must_fit_the_producers_message_limit() {
    let cluster = "\n[cluster]\nadvertised_http = \"http://127.0.0.1:8080\"\n";
    // Defaults: the changelog producer is configured to take a full state.
    let config = parse(&with_source_kafka("", cluster)).expect("defaults fit");
    assert_eq!(
        config.changelog_record_max_bytes(),
        config.plugins.max_state_bytes + validate::CHANGELOG_KEY_ALLOWANCE
    );
    let message = error(&with_source_kafka(
        "\"message.max.bytes\" = 1000000",
        cluster,
    ));
    assert!(message.contains("message.max.bytes"), "{message}");
    assert!(message.contains("plugins.max_state_bytes"), "{message}");
    // Without a cluster there is no changelog to fit.
    parse(&with_source_kafka("\"message.max.bytes\" = 1000000", "")).expect("single instance");
}

#[test]
fn cooperative_rebalancing_is_refused_until_supported() {
    for (name, value) in [
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("group.protocol", "consumer"),
    ] {
        let message = error(&with_source_kafka(&format!("\"{name}\" = \"{value}\""), ""));
        assert!(message.contains(name), "{message}");
        assert!(message.contains("not support"), "{message}");
    }
    parse(&with_source_kafka(
        "\"partition.assignment.strategy\" = \"roundrobin\"",
        "",
    ))
    .expect("eager strategies are fine");
}

#[test]
fn a_cluster_secret_is_read_checked_and_required_with_auth() {
    let cluster = "\n[cluster]\nadvertised_http = \"http://127.0.0.1:8080\"\n";
    let auth = "\n[http.auth]\ntoken_env = \"WAGG_TOKEN\"\n";
    let without = error(&format!("{MINIMAL}{auth}{cluster}"));
    assert!(without.contains("needs `cluster.secret_env`"), "{without}");
    let both = error(&format!(
        "{MINIMAL}{cluster}secret_env = \"X\"\nsecret_file = \"s\"\n"
    ));
    assert!(both.contains("not both"), "{both}");

    let dir = tempfile::tempdir().unwrap();
    let text = format!("{MINIMAL}{auth}{cluster}secret_file = \"secret\"\n");
    let config = Config::parse(&text, "wagg.toml", dir.path()).expect("valid");
    let missing = config.cluster_secret().unwrap_err();
    assert!(missing.contains("cannot read"), "{missing}");
    std::fs::write(dir.path().join("secret"), "too-short-secret\n").unwrap();
    let short = config.cluster_secret().unwrap_err();
    assert!(short.contains("at least 32 characters"), "{short}");
    assert!(!short.contains("too-short"), "{short}");
    let secret = "a-shared-cluster-secret-of-32-chars!";
    std::fs::write(dir.path().join("secret"), format!("  {secret}\n")).unwrap();
    assert_eq!(config.cluster_secret().unwrap().as_deref(), Some(secret));
    assert!(parse(MINIMAL).unwrap().cluster_secret().unwrap().is_none());
}

#[test]
fn emit_settings_are_checked_naming_the_field() {
    let with_emit = |emit: &str, window: &str| format!("{MINIMAL}emit = {emit}\n{window}");
    let ok = parse(&with_emit(r#"{ topic = "changes" }"#, "")).expect("valid");
    let emit = ok.aggregations[0].emit.as_ref().expect("emit");
    assert_eq!(
        (emit.mode, emit.format),
        (EmitMode::Changes, EmitFormat::Json)
    );
    assert_eq!(ok.emit_topics(), ["changes"]);
    let state = parse(&with_emit(r#"{ topic = "changes", format = "state" }"#, "")).expect("valid");
    assert_eq!(
        state.aggregations[0].emit.as_ref().map(|e| e.format),
        Some(EmitFormat::State)
    );
    let windowed = parse(&with_emit(
        r#"{ topic = "t", mode = "final" }"#,
        r#"window = { kind = "tumbling", size = "1m" }"#,
    ))
    .expect("final mode on a windowed aggregation");
    assert_eq!(
        windowed.aggregations[0].emit.as_ref().map(|e| e.mode),
        Some(EmitMode::Final)
    );
    let cases = [
        (r#"{ topic = "purchases" }"#, "", "also in `source.topics`"),
        (r#"{ topic = " " }"#, "", "`emit.topic` is empty"),
        (
            r#"{ topic = "t", mode = "final" }"#,
            "",
            "applies to windowed aggregations",
        ),
        (r#"{ topic = "t", mode = "sometimes" }"#, "", "sometimes"),
        (r#"{ topic = "t", partition = 1 }"#, "", "partition"),
    ];
    for (emit, window, wanted) in cases {
        let message = error(&with_emit(emit, window));
        assert!(message.contains(wanted), "{emit} {window}: {message}");
    }
}

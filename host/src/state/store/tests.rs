use super::*;
use proptest::prelude::*;

fn open(dir: &Path) -> StateStore {
    StateStore::open(dir, &["a", "b"], &StoreOptions::default()).expect("open")
}

fn meta(format: u32) -> AggregationMeta {
    AggregationMeta {
        plugin_name: "count".into(),
        plugin_version: "0.1.0".into(),
        state_format: format,
        content_hash: "abc".into(),
        removed: false,
        migration: None,
    }
}

#[test]
fn states_offsets_and_counters_commit_together_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let t = store.topic_id("orders").expect("id");
        let slot = Slot {
            topic_id: t,
            partition: 3,
        };
        let mut batch = store.begin_write();
        batch.put_state("a", slot, b"k1", b"s1").unwrap();
        batch.put_state("b", Slot::REKEYED, b"k2", b"s2").unwrap();
        batch.set_offset(t, 3, 42);
        batch.set_counters(
            "a",
            &AggregationCounters {
                records_applied: 10,
                records_failed: 1,
                records_dead_lettered: 1,
                records_late: 0,
                records_dropped: 0,
            },
        );
        // Nothing is visible before the write.
        assert_eq!(store.get("a", slot, b"k1").unwrap(), None);
        store.write(batch).expect("write");
        assert_eq!(store.get("a", slot, b"k1").unwrap(), Some(b"s1".to_vec()));
    }
    let store = open(dir.path());
    let slot = Slot {
        topic_id: store.topic_id("orders").unwrap(),
        partition: 3,
    };
    assert_eq!(slot.topic_id, 0, "topic ids are persisted");
    assert_eq!(store.get("a", slot, b"k1").unwrap(), Some(b"s1".to_vec()));
    assert_eq!(store.find("b", b"k2").unwrap(), Some(b"s2".to_vec()));
    assert_eq!(
        store.offsets().unwrap(),
        BTreeMap::from([(("orders".to_owned(), 3), 42)])
    );
    assert_eq!(
        store.counters("a").unwrap(),
        AggregationCounters {
            records_applied: 10,
            records_failed: 1,
            records_dead_lettered: 1,
            records_late: 0,
            records_dropped: 0,
        }
    );
    assert_eq!(store.counters("b").unwrap(), AggregationCounters::default());
}

#[test]
fn a_second_process_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = open(dir.path());
    let error = StateStore::open(dir.path(), &["a"], &StoreOptions::default())
        .err()
        .expect("must be refused");
    assert!(matches!(error, StoreError::Locked { .. }), "{error}");
    assert!(
        error.to_string().contains("in use by another wagg process"),
        "{error}"
    );
}

#[test]
fn incompatible_state_formats_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    assert_eq!(
        store.check_aggregation_meta("a", &meta(1)).unwrap(),
        Registration::New
    );
    store
        .register_aggregation("a", &meta(1), &BTreeMap::new())
        .expect("first start records the plugin");
    assert_eq!(
        store
            .check_aggregation_meta("a", &meta(1))
            .expect("same plugin is fine"),
        Registration::Known
    );
    let newer = AggregationMeta {
        plugin_version: "0.2.0".into(),
        content_hash: "def".into(),
        ..meta(1)
    };
    store
        .check_aggregation_meta("a", &newer)
        .expect("a new version with the same format is fine");
    assert_eq!(store.aggregation_meta("a").unwrap(), Some(newer));
    let error = store
        .check_aggregation_meta("a", &meta(2))
        .expect_err("format change");
    let message = error.to_string();
    assert!(
        message.contains("state format 1") && message.contains("uses format 2"),
        "{message}"
    );
    let other = AggregationMeta {
        plugin_name: "sum".into(),
        ..meta(1)
    };
    assert!(store.check_aggregation_meta("a", &other).is_err());
}

#[test]
fn catch_up_progress_is_registered_advanced_reset_and_cleared_with_the_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let t = store.topic_id("t").unwrap();
    let start: BTreeMap<(String, i32), i64> =
        [(("t".to_owned(), 0), 0), (("t".to_owned(), 1), 0)].into();
    store.register_aggregation("a", &meta(1), &start).unwrap();
    assert_eq!(store.aggregation_meta("a").unwrap(), Some(meta(1)));
    assert_eq!(
        store.catch_ups("t", 0).unwrap(),
        [("a".to_owned(), 0)].into()
    );

    let mut write = store.begin_write();
    write
        .put_state(
            "a",
            Slot {
                topic_id: t,
                partition: 0,
            },
            b"k",
            b"1",
        )
        .unwrap();
    write.set_catch_up(t, 0, "a", Some(7));
    write.set_catch_up(t, 1, "a", None);
    store.write(write).unwrap();
    let all = store.all_catch_ups().unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[&("t".to_owned(), 0)], [("a".to_owned(), 7)].into());

    // A reset clears the states and starts over where it is told.
    store
        .reset_aggregation("a", &[(("t".to_owned(), 1), 3)].into())
        .unwrap();
    assert_eq!(store.find("a", b"k").unwrap_or_default(), None);
    assert_eq!(store.catch_ups("t", 0).unwrap(), BTreeMap::new());
    assert_eq!(
        store.catch_ups("t", 1).unwrap(),
        [("a".to_owned(), 3)].into()
    );

    // A partition cleared for a restore loses its catch-up entries too.
    store
        .clear_slot(
            &["a"],
            Slot {
                topic_id: t,
                partition: 1,
            },
        )
        .unwrap();
    assert!(store.all_catch_ups().unwrap().is_empty());
}

#[test]
fn dropping_an_aggregation_deletes_all_of_it_and_only_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let t = store.topic_id("t").unwrap();
        store
            .register_aggregation("a", &meta(1), &[(("t".to_owned(), 0), 0)].into())
            .unwrap();
        let mut write = store.begin_write();
        let slot = Slot {
            topic_id: t,
            partition: 0,
        };
        write.put_state("a", slot, b"k", b"1").unwrap();
        write.put_state("b", slot, b"k", b"2").unwrap();
        write.set_counters(
            "a",
            &AggregationCounters {
                records_applied: 5,
                ..Default::default()
            },
        );
        store.write(write).unwrap();
    }
    // Reopened without `a` in the config: its state is still there, and
    // it is marked removed (once), so that adding it back starts it over.
    let store = StateStore::open(dir.path(), &["b"], &StoreOptions::default()).unwrap();
    assert_eq!(store.stored_aggregations(), ["a", "b"]);
    assert_eq!(store.mark_removed(&["b"]).unwrap(), ["a"]);
    assert!(store.mark_removed(&["b"]).unwrap().is_empty());
    assert_eq!(
        store.check_aggregation_meta("a", &meta(2)).unwrap(),
        Registration::New,
        "a removed aggregation starts over, whatever its format now"
    );
    assert!(store.drop_aggregation("a").unwrap());
    assert!(
        !store.drop_aggregation("a").unwrap(),
        "nothing left the second time"
    );
    assert_eq!(store.stored_aggregations(), ["b"]);
    assert_eq!(store.aggregation_meta("a").unwrap(), None);
    assert_eq!(store.counters("a").unwrap(), AggregationCounters::default());
    assert!(store.all_catch_ups().unwrap().is_empty());
    assert_eq!(store.find("b", b"k").unwrap(), Some(b"2".to_vec()));
    drop(store);
    let store = StateStore::open(dir.path(), &["b"], &StoreOptions::default()).unwrap();
    assert_eq!(store.stored_aggregations(), ["b"]);
}

#[test]
fn unknown_aggregations_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    assert!(matches!(
        store.find("nope", b"k"),
        Err(StoreError::UnknownAggregation(_))
    ));
}

proptest! {
    /// Listing pages through every key exactly once, in order, whatever the
    /// slots, prefix and page size.
    #[test]
    fn paging_visits_every_matching_key_once_in_order(
        entries in proptest::collection::btree_map(
            ("[ab]{0,3}", 0u32..3),
            proptest::collection::vec(any::<u8>(), 0..4),
            0..40,
        ),
        prefix in "[ab]{0,2}",
        page in 1usize..7,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut batch = store.begin_write();
        // One key lives in one slot (as with Kafka keys): last writer wins.
        let mut expected = BTreeMap::new();
        for ((key, partition), state) in &entries {
            expected.insert(key.clone().into_bytes(), (*partition, state.clone()));
        }
        for (key, (partition, state)) in &expected {
            batch.put_state("a", Slot { topic_id: 0, partition: *partition }, key, state).unwrap();
        }
        store.write(batch).unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = expected
            .iter()
            .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
            .map(|(k, (_, s))| (k.clone(), s.clone()))
            .collect();
        let mut got = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page_items = store.list("a", prefix.as_bytes(), after.as_deref(), page).unwrap();
            prop_assert!(page_items.len() <= page);
            let done = page_items.len() < page;
            after = page_items.last().map(|(k, _)| k.clone());
            got.extend(page_items);
            if done { break; }
        }
        prop_assert_eq!(got, want);
    }
}

#[test]
fn lookups_find_keys_in_slots_written_after_the_first_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let slot = |partition| Slot {
        topic_id: 0,
        partition,
    };
    let mut batch = store.begin_write();
    batch
        .put_raw("a", &slot(1).store_key(b"k1"), b"s1")
        .unwrap();
    store.write(batch).unwrap();
    // The first lookup scans (and remembers) the slots.
    assert_eq!(store.find("a", b"k1").unwrap(), Some(b"s1".to_vec()));
    assert_eq!(store.find("a", b"k2").unwrap(), None);
    let mut batch = store.begin_write();
    batch
        .put_raw("a", &slot(5).store_key(b"k2"), b"s2")
        .unwrap();
    batch.put_state("a", slot(7), b"k3", b"s3").unwrap();
    batch
        .put_raw("b", &slot(2).store_key(b"k4"), b"s4")
        .unwrap();
    store.write(batch).unwrap();
    assert_eq!(store.find("a", b"k2").unwrap(), Some(b"s2".to_vec()));
    assert_eq!(store.find("a", b"k3").unwrap(), Some(b"s3".to_vec()));
    assert_eq!(store.find("b", b"k4").unwrap(), Some(b"s4".to_vec()));
    assert_eq!(store.slots("a").unwrap(), vec![slot(1), slot(5), slot(7)]);
}

/// A migration walks every key once, whole keys per chunk (a key in two
/// slots is never split), keeps its cursor across a reopen (a crash), tells
/// queries which keys are still old, and ends with catch-up entries; a
/// reset ends it too.
#[test]
fn a_migration_walks_whole_keys_in_order_survives_reopen_and_ends_with_catch_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys: Vec<Vec<u8>> = (0..25).map(|i| format!("k{i:02}").into_bytes()).collect();
    let (p0, p1);
    {
        let store = open(dir.path());
        let t = store.topic_id("orders").unwrap();
        (p0, p1) = (
            Slot {
                topic_id: t,
                partition: 0,
            },
            Slot {
                topic_id: t,
                partition: 1,
            },
        );
        let mut batch = store.begin_write();
        for key in &keys {
            batch.put_state("a", p0, key, b"old").unwrap();
        }
        // "k04" also lives in partition 1 (a null key does, for one).
        batch.put_state("a", p1, b"k04", b"old").unwrap();
        batch.set_offset(t, 0, 100);
        batch.set_offset(t, 1, 50);
        batch.set_catch_up(t, 1, "a", Some(20));
        batch.set_aggregation_meta("a", &meta(1)).unwrap();
        store.write(batch).unwrap();
        let migration = store
            .begin_migration("a", &meta(1), &meta(2), |_| true)
            .unwrap();
        // Where it stands: the partition's offset, or its catch-up entry.
        assert_eq!(
            migration.resume,
            vec![("orders".to_owned(), 0, 100), ("orders".to_owned(), 1, 20)]
        );
        assert!(store.catch_ups("orders", 1).unwrap().is_empty());
        let mut target = meta(2);
        target.migration = Some(migration);
        // The first chunk: 5 entries asked, the 5th ("k04" in p0) has a
        // twin in p1 beyond the page, so it waits for the next chunk.
        let chunk = store
            .migration_chunk("a", target.migration.as_ref().unwrap(), 5)
            .unwrap();
        let got: Vec<&[u8]> = chunk.iter().map(|(_, k, _)| k.as_slice()).collect();
        assert_eq!(got, [b"k00", b"k01", b"k02", b"k03"]);
        let states: Vec<(Slot, &[u8], Vec<u8>)> = chunk
            .iter()
            .map(|(slot, key, _)| (*slot, key.as_slice(), b"new".to_vec()))
            .collect();
        let migration = target.migration.as_mut().unwrap();
        migration.through = Some(b"k03".to_vec());
        migration.keys_migrated = 4;
        store.write_migrated("a", &target, &states).unwrap();
        let (state, behind) = store.reading("a", |s| s.get("a", p0, b"k03")).unwrap();
        assert_eq!(state.as_deref(), Some(b"new".as_slice()));
        let behind = behind.expect("migrating");
        assert_eq!(behind.old_format_of(b"k03"), None);
        assert_eq!(behind.old_format_of(b"k04"), Some(1));
    }
    // Reopened (a crash): the cursor is where the last chunk left it.
    let store = open(dir.path());
    let stored = store.aggregation_meta("a").unwrap().unwrap();
    assert_eq!(stored.state_format, 2);
    let mut migration = stored.migration.clone().expect("still migrating");
    assert_eq!(migration.through.as_deref(), Some(b"k03".as_slice()));
    let (_, behind) = store.reading("a", |_| Ok(())).unwrap();
    assert_eq!(behind.unwrap().old_format_of(b"k10"), Some(1));
    let next = store.migration_chunk("a", &migration, 5).unwrap();
    let got: Vec<(u32, &[u8])> = next
        .iter()
        .map(|(slot, k, _)| (slot.partition, k.as_slice()))
        .collect();
    assert_eq!(got[..2], [(0, b"k04".as_slice()), (1, b"k04".as_slice())]);
    // The rest, to the end; then an empty chunk.
    migration.through = Some(b"k24".to_vec());
    let mut done = stored.clone();
    done.migration = Some(migration.clone());
    store.write_migrated("a", &done, &[]).unwrap();
    assert!(
        store
            .migration_chunk("a", &migration, 5)
            .unwrap()
            .is_empty()
    );
    let catch_up = BTreeMap::from([(("orders".to_owned(), 1), 20)]);
    store.finish_migration("a", &done, &catch_up).unwrap();
    assert_eq!(
        store.aggregation_meta("a").unwrap().unwrap().migration,
        None
    );
    assert_eq!(
        store.catch_ups("orders", 1).unwrap(),
        BTreeMap::from([("a".to_owned(), 20)])
    );
    assert_eq!(store.reading("a", |_| Ok(())).unwrap().1, None);

    // A reset of a migrating aggregation ends the migration.
    let again = store
        .begin_migration("a", &meta(2), &meta(3), |_| false)
        .unwrap();
    assert_eq!(again.from_format, 2);
    store.reset_aggregation("a", &BTreeMap::new()).unwrap();
    assert_eq!(
        store.aggregation_meta("a").unwrap().unwrap().migration,
        None
    );
    assert_eq!(store.reading("a", |_| Ok(())).unwrap().1, None);
}

#[test]
fn stream_times_are_read_per_partition_and_per_aggregation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let t = store.topic_id("t").unwrap();
    let u = store.topic_id("u").unwrap();
    let mut write = store.begin_write();
    write.set_stream_time(t, 0, "a", Some(-5));
    write.set_stream_time(t, 0, "b", Some(7));
    write.set_stream_time(t, 1, "a", Some(9));
    write.set_stream_time(u, 0, "a", Some(11));
    store.write(write).unwrap();
    assert_eq!(
        store.stream_times_of("t", 0).unwrap(),
        [("a".to_owned(), -5), ("b".to_owned(), 7)].into()
    );
    assert_eq!(
        store.stream_times_of("t", 1).unwrap(),
        [("a".to_owned(), 9)].into()
    );
    assert_eq!(store.stream_times_of("v", 0).unwrap(), BTreeMap::new());
    assert_eq!(
        store.stream_times("a").unwrap(),
        [
            (("t".to_owned(), 0), -5),
            (("t".to_owned(), 1), 9),
            (("u".to_owned(), 0), 11)
        ]
        .into()
    );
    // Deleting one leaves the others.
    let mut write = store.begin_write();
    write.set_stream_time(t, 0, "a", None);
    store.write(write).unwrap();
    assert_eq!(
        store.stream_times_of("t", 0).unwrap(),
        [("b".to_owned(), 7)].into()
    );
}

/// One step of the key-count property test.
#[derive(Debug, Clone)]
enum CountOp {
    Put(u8, u32),
    Delete(u8, u32),
    RawPut(u8, u32),
    ClearSlot(u32),
    ClearAggregation,
    Write,
}

fn count_op() -> impl Strategy<Value = CountOp> {
    prop_oneof![
        6 => (0u8..12, 0u32..3).prop_map(|(k, p)| CountOp::Put(k, p)),
        3 => (0u8..12, 0u32..3).prop_map(|(k, p)| CountOp::Delete(k, p)),
        2 => (0u8..12, 0u32..3).prop_map(|(k, p)| CountOp::RawPut(k, p)),
        1 => (0u32..3).prop_map(CountOp::ClearSlot),
        1 => Just(CountOp::ClearAggregation),
        4 => Just(CountOp::Write),
    ]
}

proptest! {
    /// The kept count of an aggregation's states equals the number of
    /// states it holds after any mix of puts, deletes (of present and
    /// absent keys), repeated writes of a key in one batch, cleared slots
    /// and cleared aggregations, and after a reopen.
    #[test]
    fn key_counts_equal_the_states_held(ops in proptest::collection::vec(count_op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let slot = |partition| Slot { topic_id: 0, partition };
        // A key lives in one slot (its partition's), as with Kafka keys.
        let mut batch = store.begin_write();
        for op in ops {
            match op {
                CountOp::Put(key, partition) => {
                    batch.put_state("a", slot(partition), &[key, partition as u8], b"s").unwrap();
                    batch.put_state("b", slot(partition), &[key, partition as u8], b"s").unwrap();
                }
                CountOp::Delete(key, partition) => {
                    batch.delete_state("a", slot(partition), &[key, partition as u8]).unwrap();
                }
                CountOp::RawPut(key, partition) => {
                    batch.put_raw("a", &slot(partition).store_key(&[key, partition as u8]), b"r").unwrap();
                }
                CountOp::ClearAggregation => batch.clear_aggregation("a").unwrap(),
                CountOp::ClearSlot(partition) => {
                    store.write(std::mem::replace(&mut batch, store.begin_write())).unwrap();
                    store.clear_slot(&["a", "b"], slot(partition)).unwrap();
                }
                CountOp::Write => {
                    store.write(std::mem::replace(&mut batch, store.begin_write())).unwrap();
                }
            }
        }
        store.write(batch).unwrap();
        for aggregation in ["a", "b"] {
            let held = store.list(aggregation, b"", None, 10_000).unwrap().len() as u64;
            prop_assert_eq!(store.count_keys(aggregation).unwrap(), held, "{}", aggregation);
        }
        drop(store);
        let store = open(dir.path());
        let held = store.list("a", b"", None, 10_000).unwrap().len() as u64;
        prop_assert_eq!(store.count_keys("a").unwrap(), held);
    }
}

/// A store written before key counts existed (no counts, no marker) is
/// counted once when opened; a dropped aggregation's counts go with it.
#[test]
fn a_store_without_key_counts_is_counted_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let mut batch = store.begin_write();
        for (partition, key) in [(0, b"x"), (1, b"y"), (1, b"z")] {
            let slot = Slot {
                topic_id: 0,
                partition,
            };
            batch.put_state("a", slot, key, b"s").unwrap();
        }
        store.write(batch).unwrap();
        assert_eq!(store.count_keys("a").unwrap(), 3);
        // What an older wagg left: states only.
        let meta = store.meta();
        let (start, end) = key_count::counts_range("a");
        store.db.delete_range_cf(&meta, &start, &end).unwrap();
        store
            .db
            .delete_cf(&meta, meta_key(KEYS_COUNTED_PREFIX, b"a"))
            .unwrap();
        assert_eq!(store.count_keys("a").unwrap(), 0);
    }
    let store = open(dir.path());
    assert_eq!(store.count_keys("a").unwrap(), 3);
    assert!(store.drop_aggregation("a").unwrap());
    store.add_aggregation("a").unwrap();
    assert_eq!(store.count_keys("a").unwrap(), 0);
}

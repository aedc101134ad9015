use super::*;

fn ext(sector: u64) -> Extent {
    Extent {
        sector,
        len: 4096,
        compressed: false,
        crc: sector as u32 ^ 0x5a5a,
    }
}

/// Everything a replay from `mark` hands out, as text.
fn replay(dir: &Path, mark: Mark) -> (MapLog, Replayed, Vec<String>) {
    let mut seen = Vec::new();
    let (log, r) = MapLog::open(dir, mark, |e| {
        seen.push(match e {
            Entry::Write { layer, first, exts } => format!(
                "w {layer} {first} {:?}",
                exts.iter().map(|e| e.sector).collect::<Vec<_>>()
            ),
            Entry::Change { chunk, ms, .. } => format!("c {chunk} {ms}"),
        })
    })
    .expect("open");
    (log, r, seen)
}

#[test]
fn records_replay_in_order_from_the_mark_and_the_next_open_starts_a_new_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, r, seen) = replay(dir.path(), Mark::default());
    assert_eq!((r, seen.len()), (Replayed::default(), 0));
    assert_eq!(log.gen(), 1);
    log.add_write(7, 10, &[ext(80), ext(88)]);
    log.add_change(Uuid::nil(), 3, 1234);
    assert!(log.commit().expect("commit").is_some());
    let mid = log.end_mark();
    log.add_write(7, 200, &[ext(800)]);
    log.commit().expect("commit");
    assert!(
        log.commit().expect("empty commit").is_none(),
        "nothing to append"
    );
    let dirty: Vec<_> = log.take_dirty().iter().collect();
    assert_eq!(
        dirty,
        vec![(7, 0), (7, 3)],
        "chunks 0 and 3 of layer 7 changed"
    );
    drop(log);

    let (log, r, seen) = replay(dir.path(), Mark::default());
    assert_eq!(r.records, 2);
    assert_eq!(seen, vec!["w 7 10 [80, 88]", "c 3 1234", "w 7 200 [800]"]);
    assert_eq!(log.gen(), 2, "a new file after the last one");
    drop(log);
    let (_, r, seen) = replay(dir.path(), mid);
    assert_eq!((r.records, seen), (1, vec!["w 7 200 [800]".to_string()]));
}

#[test]
fn a_torn_tail_ends_its_file_but_not_the_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = replay(dir.path(), Mark::default());
    log.add_write(1, 0, &[ext(8)]);
    log.commit().expect("commit");
    log.add_write(1, 1, &[ext(16)]);
    log.commit().expect("commit");
    drop(log);
    // The second record loses its last byte (a crash before it was synced).
    let path = dir.path().join(DIR).join(file_name(1));
    let f = File::options().write(true).open(&path).expect("open");
    f.set_len(std::fs::metadata(&path).expect("meta").len() - 1)
        .expect("cut");
    let (mut log, r, seen) = replay(dir.path(), Mark::default());
    assert_eq!((r.records, r.torn), (1, 1));
    assert_eq!(seen, vec!["w 1 0 [8]"]);
    // A later file still replays after the torn one.
    log.add_write(1, 2, &[ext(24)]);
    log.commit().expect("commit");
    drop(log);
    let (_, r, seen) = replay(dir.path(), Mark::default());
    assert_eq!((r.records, r.torn), (2, 1));
    assert_eq!(seen, vec!["w 1 0 [8]", "w 1 2 [24]"]);
}

#[test]
fn a_record_with_a_bad_checksum_or_out_of_sequence_is_not_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = replay(dir.path(), Mark::default());
    for i in 0..3 {
        log.add_write(1, i, &[ext(8 * (i + 1))]);
        log.commit().expect("commit");
    }
    drop(log);
    let path = dir.path().join(DIR).join(file_name(1));
    let mut data = std::fs::read(&path).expect("read");
    let rec = data.len() / 3;
    // Flip a bit in the second record's extent.
    data[rec + HEADER + 25] ^= 1;
    std::fs::write(&path, &data).expect("write");
    let (_, r, seen) = replay(dir.path(), Mark::default());
    assert_eq!(
        (r.records, seen),
        (1, vec!["w 1 0 [8]".to_string()]),
        "replay stops at the damaged record, and applies nothing of it"
    );

    // Three valid records, the third sequence-numbered as the first: stale bytes.
    let mut data = std::fs::read(&path).expect("read");
    data[rec + HEADER + 25] ^= 1;
    let first = data[..rec].to_vec();
    data[2 * rec..].copy_from_slice(&first);
    std::fs::write(&path, &data).expect("write");
    let (_, r, _) = replay(dir.path(), Mark::default());
    assert_eq!(r.records, 2, "the out-of-sequence record ends the file");
}

#[test]
fn files_wholly_before_the_mark_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _, _) = replay(dir.path(), Mark::default());
    log.add_write(1, 0, &[ext(8)]);
    log.commit().expect("commit");
    let next = log.prepare_next().expect("next");
    log.switch(next);
    let mark = log.end_mark();
    assert_eq!(mark, Mark { gen: 2, offset: 0 });
    assert_eq!(files(dir.path()), vec![1, 2]);
    assert_eq!(
        log.live_files().len(),
        2,
        "a Flush syncs both until the mark moves"
    );
    log.forget_before(mark);
    assert_eq!(files(dir.path()), vec![2]);
    assert_eq!(log.live_files().len(), 1);
    drop(log);
    let (_, r, _) = replay(dir.path(), mark);
    assert_eq!(r.records, 0);
    assert_eq!(files(dir.path()), vec![2, 3]);
}

#[test]
fn dirty_chunks_are_counted_once_and_listed_in_layer_then_chunk_order() {
    let mut d = Dirty::default();
    assert!(d.is_empty());
    for (layer, idx) in [(9, 200), (2, 5), (9, 3), (2, 5), (2, 64), (9, 200), (2, 63)] {
        d.insert(layer, idx);
    }
    assert_eq!(d.len(), 5, "repeats are not counted");
    let mut back = Dirty::default();
    back.insert(2, 5);
    back.insert(4, 0);
    back.extend(d);
    assert_eq!(back.len(), 6);
    assert_eq!(
        back.iter().collect::<Vec<_>>(),
        vec![(2, 5), (2, 63), (2, 64), (4, 0), (9, 3), (9, 200)]
    );
}

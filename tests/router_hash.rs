//! Golden vectors: a key must route the same way in every process, on every machine and
//! in every release. If one of these fails, the routing function changed and every
//! deployed cluster would re-route its keys: that needs a new, versioned hash, not an
//! edit of the vectors.

use cauce::router::{InstanceId, Member, Router, SlotRouter, SlotRouterOptions, key_hash};

#[test]
fn key_hash_is_xxh3_64_with_the_documented_seed() {
    // The reference value of XXH3-64 for the empty input and seed 0, from the xxHash
    // specification's test vectors: the algorithm is the published one.
    assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2d06_8005_38d3_94c2);
    assert_eq!(
        cauce::router::hash::KEY_SEED,
        u64::from_le_bytes(*b"cauce.k1")
    );
    assert_eq!(
        key_hash(b"alice"),
        xxhash_rust::xxh3::xxh3_64_with_seed(b"alice", cauce::router::hash::KEY_SEED)
    );
}

#[test]
fn key_hash_matches_golden_vectors() {
    let vectors: [(&[u8], u64); 5] = [
        (b"", 0xd08b_2492_ad9a_abe7),
        (b"a", 0xb815_c3df_c150_0463),
        (b"alice", 0x0617_682e_f693_f4a1),
        (b"user-00000000042", 0x6550_874e_997c_3449),
        (&[0xff; 100], 0x1c50_8093_2d2d_f1e6),
    ];
    for (key, hash) in vectors {
        assert_eq!(key_hash(key), hash, "key {key:?}");
    }
}

fn golden_router() -> SlotRouter {
    let members = [(1, 1), (2, 1), (3, 2), (7, 1), (40, 3)].map(|(id, weight)| Member {
        id: InstanceId(id),
        weight,
    });
    SlotRouter::from_members(SlotRouterOptions::default(), &members).unwrap()
}

#[test]
fn routing_matches_golden_vectors() {
    let router = golden_router();
    let vectors: [(&str, [u32; 5]); 10] = [
        ("alice", [2, 7, 40, 3, 1]),
        ("bob", [40, 2, 3, 1, 7]),
        ("carol", [40, 1, 3, 7, 2]),
        ("dave", [2, 1, 40, 3, 7]),
        ("erin", [40, 2, 7, 1, 3]),
        ("frank", [40, 3, 1, 7, 2]),
        ("user-1", [1, 2, 40, 3, 7]),
        ("user-2", [40, 3, 1, 2, 7]),
        ("user-3", [40, 3, 2, 1, 7]),
        ("user-4", [40, 1, 2, 3, 7]),
    ];
    let mut list = Vec::new();
    for (key, expected) in vectors {
        router.preference_list(key.as_bytes(), 5, &mut list);
        let ids: Vec<u32> = list.iter().map(|id| id.0).collect();
        assert_eq!(ids, expected, "key {key}");
        assert_eq!(
            router.owner_of(key.as_bytes()),
            Some(InstanceId(expected[0]))
        );
    }
}

#[test]
fn slot_table_matches_golden_vectors() {
    let table = golden_router().table();
    let counts: Vec<(u32, usize)> = table
        .slot_counts()
        .into_iter()
        .map(|(id, n)| (id.0, n))
        .collect();
    assert_eq!(
        counts,
        [(1, 8151), (2, 8217), (3, 16390), (7, 8173), (40, 24605)]
    );
    let sampled: Vec<u32> = (0..8)
        .map(|s| table.slot_owner(s * 8191).unwrap().0)
        .collect();
    assert_eq!(sampled, [1, 40, 3, 1, 40, 40, 1, 3]);
}

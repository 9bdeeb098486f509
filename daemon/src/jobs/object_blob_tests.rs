//! Tests of [`super`], the object-store `BlobStore`: the blob-store contract on a `file://` URL
//! and on a real S3-protocol server (s3s-fs), what replicas share through it, and what an import
//! that dies before its commit leaves every replica.
use std::io::Read;
use std::sync::OnceLock;

use super::*;
use crate::jobs::storage::contract;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("itamae-objblob-{tag}-{}", new_id("")));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The S3 server the tests use: the one `ITAMAE_TEST_S3_ENDPOINT` names (with the AWS_*
/// credentials beside it), else `make test`'s shared one, else one started for this test
/// binary (stopped when it exits). Returns the client options.
fn s3_options() -> &'static Vec<(String, String)> {
    static OPTS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    OPTS.get_or_init(|| {
        let from_env = |vars: &dyn Fn(&str) -> Option<String>| {
            let get = |k: &str| vars(k).unwrap_or_else(|| panic!("{k} is not set"));
            vec![
                ("aws_endpoint".into(), get("ITAMAE_TEST_S3_ENDPOINT")),
                ("aws_access_key_id".into(), get("AWS_ACCESS_KEY_ID")),
                ("aws_secret_access_key".into(), get("AWS_SECRET_ACCESS_KEY")),
                (
                    "aws_region".into(),
                    vars("AWS_REGION").unwrap_or("us-east-1".into()),
                ),
                ("aws_allow_http".into(), "true".into()),
            ]
        };
        if std::env::var_os("ITAMAE_TEST_S3_ENDPOINT").is_some() {
            return from_env(&|k| std::env::var(k).ok());
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services/s3.sh");
        let run = |args: &[&str]| {
            std::process::Command::new(script)
                .args(args)
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {script}: {e}"))
        };
        let mut out = run(&["env", "--shared"]);
        if !out.status.success() {
            let me = std::process::id().to_string();
            out = run(&["start", "--owner", &me]);
            assert!(out.status.success(), "{script} start failed");
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let vars: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(&|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    })
}

fn s3_blob(prefix: &str, cache: &Path) -> ObjectBlob {
    let bucket = std::env::var("ITAMAE_TEST_S3_BUCKET").unwrap_or("itamae-test".into());
    let cfg = ObjectsConfig {
        url: format!("s3://{bucket}/{prefix}"),
        options: s3_options().clone(),
    };
    ObjectBlob::open(&cfg, cache, runtime().handle().clone()).unwrap()
}

fn file_blob(store: &Path, cache: &Path) -> ObjectBlob {
    let cfg = ObjectsConfig {
        url: url::Url::from_directory_path(store).unwrap().to_string(),
        options: Vec::new(),
    };
    ObjectBlob::open(&cfg, cache, runtime().handle().clone()).unwrap()
}

fn stored_files(b: &ObjectBlob) -> usize {
    b.list(&b.key(&["files"])).unwrap().len()
}

fn contract_on(b: &ObjectBlob, dir: &Path) {
    contract::run(b, dir, &|| stored_files(b));
}

/// What one replica stores, another with an empty cache reads back; a checkpoint without
/// its marker is ignored; a replaced checkpoint is downloaded again, not served stale.
fn replicas_share(a: &ObjectBlob, b: &ObjectBlob, dir: &Path) {
    let mut w = a.begin_upload().unwrap();
    w.write_all(b"shared bytes").unwrap();
    w.commit("file-s").unwrap();
    let mut back = String::new();
    b.open_file("file-s")
        .unwrap()
        .read_to_string(&mut back)
        .unwrap();
    assert_eq!(back, "shared bytes");
    assert!(b.open_file("file-none").is_err());

    let keep = |blob: &ObjectBlob, step: usize, state: &str| {
        let w = dir.join(format!(".w-{}", new_id("")));
        std::fs::create_dir_all(w.join("sub")).unwrap();
        std::fs::write(w.join("trainer_state.json"), state).unwrap();
        std::fs::write(w.join("sub/optimizer.bin"), vec![7u8; 1000]).unwrap();
        blob.keep_checkpoint("ftjob-r", step, &w).unwrap();
    };
    keep(a, 2, "two");
    // Step 5's files are there but not its marker: a crash mid-upload.
    a.put_file(
        &a.local_checkpoint_dir("ftjob-r", 2)
            .join("trainer_state.json"),
        &a.checkpoint_key("ftjob-r", 5).join("trainer_state.json"),
    )
    .unwrap();
    assert_eq!(a.checkpoint_steps("ftjob-r").unwrap(), vec![2]);
    let (step, got) = b.latest_checkpoint("ftjob-r").unwrap();
    assert_eq!(step, 2);
    assert_eq!(
        std::fs::read(got.join("trainer_state.json")).unwrap(),
        b"two"
    );
    assert_eq!(
        std::fs::read(got.join("sub/optimizer.bin")).unwrap(),
        vec![7u8; 1000]
    );
    keep(a, 2, "two, again");
    let (_, got) = b.latest_checkpoint("ftjob-r").unwrap();
    assert_eq!(
        std::fs::read(got.join("trainer_state.json")).unwrap(),
        b"two, again"
    );

    assert_eq!(b.materialise_result("ftjob-r").unwrap(), None);
    let out = a.local_result_dir("ftjob-r");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("adapter_model.safetensors"), b"weights").unwrap();
    a.publish_result("ftjob-r").unwrap();
    let got = b.materialise_result("ftjob-r").unwrap().unwrap();
    assert_eq!(got, b.local_result_dir("ftjob-r"));
    assert_eq!(
        std::fs::read(got.join("adapter_model.safetensors")).unwrap(),
        b"weights"
    );

    let ad = a.local_adapter_dir("shared");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::write(ad.join("adapter_config.json"), b"{}").unwrap();
    a.publish_adapter("shared", 1).unwrap();
    let got = b.materialise_adapter("shared", 1).unwrap().unwrap();
    assert_eq!(
        std::fs::read(got.join("adapter_config.json")).unwrap(),
        b"{}"
    );
    // Deleted on one replica: the other finds nothing to materialise.
    a.delete_job_dir("ftjob-r", None).unwrap();
    a.delete_adapter("shared").unwrap();
    std::fs::remove_dir_all(b.local_result_dir("ftjob-r")).unwrap();
    assert_eq!(b.materialise_result("ftjob-r").unwrap(), None);
    assert_eq!(b.materialise_adapter("shared", 1).unwrap(), None);
}

/// Generation `g` of the adapter `name` as replica `blob`'s import publishes it: the files
/// installed in its local directory, then uploaded (what happens before the commit).
fn publish(blob: &ObjectBlob, name: &str, g: u64, weights: &[u8]) {
    let d = blob.local_adapter_dir(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), format!("{{\"g\":{g}}}")).unwrap();
    std::fs::write(d.join("adapter_model.safetensors"), weights).unwrap();
    blob.publish_adapter(name, g).unwrap();
}

/// The weights replica `blob` loads for generation `g` of `name`.
fn weights(blob: &ObjectBlob, name: &str, g: u64) -> Option<Vec<u8>> {
    let dir = blob.materialise_adapter(name, g).unwrap()?;
    Some(std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
}

/// The keys under the adapter `name`, relative to it.
fn adapter_keys(blob: &ObjectBlob, name: &str) -> Vec<String> {
    let root = blob.adapter_key(name);
    let mut keys: Vec<String> = blob
        .list(&root)
        .unwrap()
        .iter()
        .map(|k| {
            let rest: Vec<_> = k
                .prefix_match(&root)
                .unwrap()
                .map(|p| p.as_ref().to_string())
                .collect();
            rest.join("/")
        })
        .collect();
    keys.sort();
    keys
}

/// An importing replica (`a`) dies after uploading generation 2 but before the registry
/// commits it: every replica loading generation 1, the registry's, still gets generation
/// 1's bytes (`b` from a warm cache, `c` from an empty one, `a` restarted from a cache that
/// holds its own upload). The import done again replaces the dead one's upload; the
/// generation before the current one stays for replicas still loading it, older ones go.
fn a_crash_before_the_commit_keeps_the_committed_generation(
    a: &ObjectBlob,
    b: &ObjectBlob,
    c: &ObjectBlob,
) {
    let name = "crashy:v1";
    let one = || Some(b"one".to_vec());
    publish(a, name, 1, b"one");
    assert_eq!(weights(b, name, 1), one());
    publish(a, name, 2, b"two, never committed");
    for r in [a, b, c] {
        assert_eq!(
            weights(r, name, 1),
            one(),
            "a replica served the uncommitted upload"
        );
    }
    publish(b, name, 2, b"two");
    for r in [a, b, c] {
        assert_eq!(weights(r, name, 2), Some(b"two".to_vec()));
    }
    assert_eq!(
        weights(c, name, 1),
        one(),
        "the previous generation is kept"
    );
    publish(c, name, 3, b"three");
    assert_eq!(weights(a, name, 1), None, "generation 1 is two imports old");
    assert_eq!(weights(a, name, 2), Some(b"two".to_vec()));
    assert_eq!(weights(b, name, 3), Some(b"three".to_vec()));
    let keys = adapter_keys(a, name);
    assert!(
        keys.iter()
            .all(|k| k.starts_with("gen-2/") || k.starts_with("gen-3/")),
        "{keys:?}"
    );
    // A marker under a generation's key that names another generation is refused.
    let d = a.local_adapter_dir(name);
    a.upload_dir(&d, &a.adapter_generation_key(name, 4), Some(9))
        .unwrap();
    assert!(a.materialise_adapter(name, 4).is_err());
    // A copy in the layout before generations had keys (the marker names none) is what
    // any generation loads until an import has one of its own, then it goes.
    let old = "legacy";
    std::fs::create_dir_all(a.local_adapter_dir(old)).unwrap();
    std::fs::write(
        a.local_adapter_dir(old).join("adapter_model.safetensors"),
        b"old",
    )
    .unwrap();
    a.upload_dir(&a.local_adapter_dir(old), &a.adapter_key(old), None)
        .unwrap();
    assert_eq!(weights(b, old, 5), Some(b"old".to_vec()));
    publish(a, old, 6, b"six");
    assert_eq!(
        weights(c, old, 5),
        Some(b"old".to_vec()),
        "still the committed one"
    );
    publish(a, old, 7, b"seven");
    let keys = adapter_keys(a, old);
    assert!(keys.iter().all(|k| k.starts_with("gen-")), "{keys:?}");
    // A delete takes every generation.
    for n in [name, old] {
        a.delete_adapter(n).unwrap();
        assert_eq!(adapter_keys(a, n), Vec::<String>::new());
        assert_eq!(weights(b, n, 3), None);
    }
}

#[test]
fn a_file_url_meets_the_blob_store_contract() {
    let d = scratch("file");
    let b = file_blob(&d.join("store"), &d.join("cache"));
    contract_on(&b, &d);
    let other = file_blob(&d.join("store"), &d.join("cache2"));
    replicas_share(&b, &other, &d);
    let third = file_blob(&d.join("store"), &d.join("cache3"));
    a_crash_before_the_commit_keeps_the_committed_generation(&b, &other, &third);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_real_s3_server_meets_the_blob_store_contract() {
    let d = scratch("s3");
    let prefix = format!("unit-{}", new_id(""));
    let b = s3_blob(&prefix, &d.join("cache"));
    contract_on(&b, &d);
    let other = s3_blob(&prefix, &d.join("cache2"));
    replicas_share(&b, &other, &d);
    let third = s3_blob(&prefix, &d.join("cache3"));
    a_crash_before_the_commit_keeps_the_committed_generation(&b, &other, &third);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn settings_that_cannot_work_are_refused_by_name() {
    let d = scratch("bad");
    let open = |url: &str, options: Vec<(String, String)>| {
        let cfg = ObjectsConfig {
            url: url.into(),
            options,
        };
        ObjectBlob::open(&cfg, &d, runtime().handle().clone())
            .err()
            .map(|e| e.to_string())
    };
    assert!(open("ftp://x/y", vec![])
        .unwrap()
        .contains("unsupported scheme `ftp`"));
    assert!(open("not a url", vec![]).unwrap().contains("is not a URL"));
    let e = open("s3://b/p", vec![("aws_colour".into(), "red".into())]).unwrap();
    assert!(e.contains("unknown option `aws_colour`"), "{e}");
    let _ = std::fs::remove_dir_all(d);
}

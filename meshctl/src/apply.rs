//! `meshctl apply -f` and `meshctl delete -f` for the local mesh: Istio
//! resources written into, or taken out of, the config directory pilot
//! watches. As `kubectl apply` does, a resource is identified by kind,
//! namespace and name (a document without a namespace is in `default`):
//! applying one replaces its definition wherever it was, in a file of its
//! own (`<kind>-<namespace>-<name>.yaml`). Everything named is checked as
//! pilot reads it before anything is written, so a bad file changes
//! nothing.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// A resource's identity, as kubectl prints it: `virtualservice.networking.istio.io/reviews`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    kind: String,
    group: String,
    namespace: String,
    name: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind.to_ascii_lowercase();
        match self.group.as_str() {
            "" => write!(f, "{kind}/{}", self.name),
            g => write!(f, "{kind}.{g}/{}", self.name),
        }
    }
}

impl Key {
    fn file_name(&self) -> String {
        format!(
            "{}-{}-{}.yaml",
            self.kind.to_ascii_lowercase(),
            self.namespace,
            self.name
        )
    }
}

/// One document the user named, checked, with its namespace filled in.
struct Object {
    key: Key,
    value: Value,
}

/// One document of a file in the config directory: its text as written
/// (comments kept) and, when it is a resource, what it is.
struct Segment {
    text: String,
    parsed: Option<(Key, Value)>,
}

/// The documents of `text`, split at `---` lines so each keeps its own text.
fn segments(path: &Path, text: &str) -> anyhow::Result<Vec<Segment>> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut flush = |current: &mut String| -> anyhow::Result<()> {
        let docs: Vec<Option<Value>> = serde_saphyr::from_multiple(current)
            .with_context(|| format!("{}: not YAML", path.display()))?;
        let parsed = match docs.into_iter().flatten().collect::<Vec<_>>().as_slice() {
            [] => None,
            [doc] => key_of(doc).map(|k| (k, doc.clone())),
            _ => anyhow::bail!("{}: cannot tell its documents apart", path.display()),
        };
        out.push(Segment {
            text: std::mem::take(current),
            parsed,
        });
        Ok(())
    };
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            flush(&mut current)?;
        } else {
            current.push_str(line);
        }
    }
    if !current.trim().is_empty() {
        flush(&mut current)?;
    }
    Ok(out)
}

fn key_of(doc: &Value) -> Option<Key> {
    let api = doc.get("apiVersion")?.as_str()?;
    let meta = doc.get("metadata")?;
    Some(Key {
        kind: doc.get("kind")?.as_str()?.to_string(),
        group: api
            .rsplit_once('/')
            .map(|(g, _)| g)
            .unwrap_or("")
            .to_string(),
        namespace: meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or(mesh_pilot::store::DEFAULT_NAMESPACE)
            .to_string(),
        name: meta.get("name")?.as_str()?.to_string(),
    })
}

/// The documents of the files, directories (their `.yaml` and `.yml`
/// files) and `-` (standard input) named, each checked as pilot would
/// read it. All errors are returned together.
fn read_objects(sources: &[PathBuf]) -> anyhow::Result<Vec<Object>> {
    let mut texts = Vec::new();
    for source in sources {
        if source.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            texts.push((PathBuf::from("<stdin>"), text));
        } else if source.is_dir() {
            for file in mesh_pilot::store::yaml_files(source)? {
                texts.push((file.clone(), mesh_pilot::store::read(&file)?));
            }
        } else {
            texts.push((source.clone(), mesh_pilot::store::read(source)?));
        }
    }
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (path, text) in texts {
        let docs: Vec<Option<Value>> = match serde_saphyr::from_multiple(&text) {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        for (i, doc) in docs.into_iter().enumerate() {
            let Some(mut doc) = doc else { continue };
            match mesh_pilot::store::parse_json(&path, doc.clone()) {
                Err(e) => errors.push(e.to_string()),
                Ok(None) => errors.push(format!(
                    "{}: document {}: {} {:?} is not a kind the mesh reads",
                    path.display(),
                    i + 1,
                    doc.get("apiVersion").and_then(Value::as_str).unwrap_or("?"),
                    doc.get("kind").and_then(Value::as_str).unwrap_or("?"),
                )),
                Ok(Some(_)) => {
                    let key = key_of(&doc).expect("pilot read its kind and name");
                    doc["metadata"]["namespace"] = Value::String(key.namespace.clone());
                    objects.push(Object { key, value: doc });
                }
            }
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("nothing was changed:\n  {}", errors.join("\n  "));
    }
    Ok(objects)
}

/// The config directory's files, split into documents.
fn read_config(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, Vec<Segment>>> {
    let mut files = BTreeMap::new();
    for file in mesh_pilot::store::yaml_files(dir)? {
        let text = mesh_pilot::store::read(&file)?;
        files.insert(file.clone(), segments(&file, &text)?);
    }
    Ok(files)
}

/// Holds the config directory's lock until dropped, waiting for another
/// `meshctl` that holds it. Each `meshctl apply` or `delete` reads the
/// directory, edits it and writes it back; two at once would each write
/// files from what they read, and the later write would undo the earlier
/// one's edit (a resource moved out of a shared file would come back there,
/// defined twice). The lock is the directory's own (`flock` on it), so
/// nothing is left behind in a directory the user keeps.
fn lock(dir: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", dir.display()))?;
    Ok(file)
}

/// Writes `text` to `path` whole or not at all: pilot never reads half a file.
/// The file written first is this write's own (process and count), so no
/// other write at the same moment can rename it away.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("config");
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Takes the documents defining `keys` out of the config files that hold
/// them; a file left with no resource is removed.
fn remove_from(files: &mut BTreeMap<PathBuf, Vec<Segment>>, keys: &[&Key]) -> anyhow::Result<()> {
    for (path, segs) in files.iter_mut() {
        let mut changed = false;
        for s in segs.iter_mut() {
            if s.parsed.as_ref().is_some_and(|(k, _)| keys.contains(&k)) {
                // Comments heading the document (a file's header) stay.
                s.text = s
                    .text
                    .split_inclusive('\n')
                    .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
                    .collect();
                s.parsed = None;
                changed = true;
            }
        }
        segs.retain(|s| s.parsed.is_some() || !s.text.trim().is_empty());
        if !changed {
            continue;
        }
        if segs.iter().all(|s| s.parsed.is_none()) {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        } else {
            let text = segs
                .iter()
                .map(|s| s.text.as_str())
                .collect::<Vec<_>>()
                .join("---\n");
            write_atomically(path, &text)?;
        }
    }
    Ok(())
}

/// Applies the resources in `sources` to the config in `dir`; returns
/// kubectl's lines (`... created`, `configured`, `unchanged`).
pub fn apply(dir: &Path, sources: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let objects = read_objects(sources)?;
    let _lock = lock(dir)?;
    let mut files = read_config(dir)?;
    let mut lines = Vec::new();
    for object in objects {
        let defined: Vec<&Value> = files
            .values()
            .flatten()
            .filter_map(|s| s.parsed.as_ref())
            .filter(|(k, _)| *k == object.key)
            .map(|(_, v)| v)
            .collect();
        let verb = match defined.as_slice() {
            [] => "created",
            [v] if **v == object.value => {
                lines.push(format!("{} unchanged", object.key));
                continue;
            }
            _ => "configured",
        };
        remove_from(&mut files, &[&object.key])?;
        let path = dir.join(object.key.file_name());
        let text = serde_saphyr::to_string(&object.value)
            .with_context(|| format!("writing {}", object.key))?;
        write_atomically(&path, &text)?;
        files.insert(path.clone(), segments(&path, &text)?);
        lines.push(format!("{} {verb}", object.key));
    }
    Ok(lines)
}

/// Deletes the resources named in `sources` from the config in `dir`.
/// Returns kubectl's lines and whether every resource was found.
pub fn delete(dir: &Path, sources: &[PathBuf]) -> anyhow::Result<(Vec<String>, bool)> {
    let objects = read_objects(sources)?;
    let _lock = lock(dir)?;
    let mut files = read_config(dir)?;
    let mut lines = Vec::new();
    let mut all_found = true;
    for object in objects {
        let found = files
            .values()
            .flatten()
            .any(|s| s.parsed.as_ref().is_some_and(|(k, _)| *k == object.key));
        if found {
            remove_from(&mut files, &[&object.key])?;
            lines.push(format!("{} deleted", object.key));
        } else {
            all_found = false;
            lines.push(format!(
                "Error from server (NotFound): {} in namespace {:?} not found",
                object.key, object.key.namespace
            ));
        }
    }
    Ok((lines, all_found))
}

/// Where the mesh run from `state_dir` keeps its config: the directory
/// `meshctl demo` recorded there, else `<state_dir>/config`.
pub fn config_dir(state_dir: &Path) -> PathBuf {
    std::fs::read_to_string(state_dir.join(CONFIG_POINTER))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
        .unwrap_or_else(|| state_dir.join("config"))
}

/// The file in a demo's state directory naming its config directory.
pub const CONFIG_POINTER: &str = "config-dir";

#[cfg(test)]
mod tests {
    use super::*;

    const REVIEWS_V1: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
";

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir(&config).unwrap();
        // A file of several resources, as the sample's are, with a comment.
        std::fs::write(
            config.join("routing.yaml"),
            format!(
                "# the sample's routing\n{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n",
                REVIEWS_V1.replace("subset: v1", "subset: v3")
            ),
        )
        .unwrap();
        (dir, config)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn apply_replaces_a_resource_wherever_it_was_and_delete_removes_it() {
        let (tmp, config) = setup();
        let file = write(tmp.path(), "v1.yaml", REVIEWS_V1);
        let lines = apply(&config, std::slice::from_ref(&file)).unwrap();
        assert_eq!(
            lines,
            ["virtualservice.networking.istio.io/reviews configured"]
        );
        // Exactly one definition remains, the applied one; the rest of the
        // sample's file, comment included, is as it was.
        let set = mesh_pilot::store::load_dir(&config).unwrap();
        let vs: Vec<_> = set
            .resources
            .iter()
            .filter(|(_, r)| r.kind() == "VirtualService")
            .collect();
        assert_eq!(vs.len(), 1);
        assert!(
            vs[0]
                .0
                .file
                .ends_with("virtualservice-default-reviews.yaml")
        );
        let routing = std::fs::read_to_string(config.join("routing.yaml")).unwrap();
        assert!(routing.starts_with("# the sample's routing\n"), "{routing}");
        assert!(routing.contains("kind: DestinationRule"), "{routing}");
        assert!(!routing.contains("VirtualService"), "{routing}");
        // Again: unchanged, nothing rewritten.
        assert_eq!(
            apply(&config, std::slice::from_ref(&file)).unwrap(),
            ["virtualservice.networking.istio.io/reviews unchanged"]
        );
        let (lines, found) = delete(&config, std::slice::from_ref(&file)).unwrap();
        assert!(found);
        assert_eq!(
            lines,
            ["virtualservice.networking.istio.io/reviews deleted"]
        );
        assert!(!config.join("virtualservice-default-reviews.yaml").exists());
        let (lines, found) = delete(&config, &[file]).unwrap();
        assert!(!found);
        assert!(lines[0].contains("NotFound"), "{lines:?}");
    }

    #[test]
    fn applies_at_once_each_keep_the_others_edits() {
        // Eight resources share one file, as a sample's do; eight applies at
        // once each move one of them into a file of its own. Every resource
        // must end up defined once, with its applied spec.
        const N: usize = 8;
        let vs = |i: usize, subset: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc{i}, namespace: default}}\nspec:\n  hosts: [svc{i}]\n  http:\n  - route:\n    - destination: {{host: svc{i}, subset: {subset}}}\n"
            )
        };
        for round in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("config");
            std::fs::create_dir(&config).unwrap();
            let shared: Vec<String> = (0..N).map(|i| vs(i, "v1")).collect();
            std::fs::write(config.join("routing.yaml"), shared.join("---\n")).unwrap();
            let files: Vec<PathBuf> = (0..N)
                .map(|i| write(dir.path(), &format!("svc{i}.yaml"), &vs(i, "v2")))
                .collect();
            let barrier = std::sync::Barrier::new(N);
            std::thread::scope(|s| {
                for file in &files {
                    let (config, barrier) = (&config, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        apply(config, std::slice::from_ref(file)).unwrap()
                    });
                }
            });
            // Each resource is defined once, in its own file, as applied.
            let set = mesh_pilot::store::load_dir(&config).unwrap();
            let files: Vec<String> = set
                .resources
                .iter()
                .map(|(at, _)| at.file.display().to_string())
                .collect();
            assert_eq!(files.len(), N, "round {round}: defined in {files:?}");
            for (at, _) in &set.resources {
                let text = std::fs::read_to_string(&at.file).unwrap();
                assert!(text.contains("subset: v2"), "round {round}: {text}");
            }
            // And nothing but the resources' files is left in the directory.
            let mut left: Vec<String> = std::fs::read_dir(&config)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            let mut expected: Vec<String> = (0..N)
                .map(|i| format!("virtualservice-default-svc{i}.yaml"))
                .collect();
            expected.sort();
            assert_eq!(left, expected, "round {round}");
        }
    }

    #[test]
    fn a_bad_document_changes_nothing_and_says_where_it_is() {
        let (tmp, config) = setup();
        let before = std::fs::read_to_string(config.join("routing.yaml")).unwrap();
        let bad = write(
            tmp.path(),
            "bad.yaml",
            &format!(
                "{REVIEWS_V1}---\n{}",
                REVIEWS_V1
                    .replace("name: reviews", "name: ratings")
                    .replace("hosts:", "hostz:")
            ),
        );
        let err = format!("{:#}", apply(&config, &[bad]).unwrap_err());
        assert!(err.contains("nothing was changed"), "{err}");
        assert!(err.contains("bad.yaml") && err.contains("hostz"), "{err}");
        assert_eq!(
            std::fs::read_to_string(config.join("routing.yaml")).unwrap(),
            before
        );
        assert_eq!(mesh_pilot::store::yaml_files(&config).unwrap().len(), 1);
        let other = write(
            tmp.path(),
            "cm.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n",
        );
        let err = format!("{:#}", apply(&config, &[other]).unwrap_err());
        assert!(
            err.contains("\"Secret\" is not a kind the mesh reads"),
            "{err}"
        );
    }
}

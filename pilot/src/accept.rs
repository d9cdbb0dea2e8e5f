//! Which resources of a load pilot accepts. A bad resource is rejected on
//! its own while the rest applies: in its place stands the version accepted
//! last time (so a broken update to a DENY policy keeps the old policy
//! enforcing, never opening what it denied), or nothing when there is none
//! or that one no longer fits either. The same holds for a file that cannot
//! be parsed and for an object from Kubernetes that cannot be read.
//!
//! Errors are attributed by the name every error of the model starts with
//! ([`crate::model::at`]). One that names no resource of the load rejects
//! the whole load, and the last good model keeps serving, as before.

use std::collections::BTreeSet;

use crate::model::{Model, at};
use crate::store::{ConfigSet, Meta, Resource, Unread};

/// What a load made of.
#[derive(Debug)]
pub struct Accepted {
    pub model: Model,
    /// The resources the model was built from: next load's fallbacks.
    pub resources: Vec<(Meta, Resource)>,
    /// What was rejected and why; empty when everything applied.
    pub errors: Vec<String>,
}

/// Rounds of rejection before pilot gives up on attributing errors.
const MAX_ROUNDS: usize = 8;

type Key = (std::path::PathBuf, &'static str, String, String);

fn key(meta: &Meta, res: &Resource) -> Key {
    (
        meta.file.to_path_buf(),
        res.kind(),
        meta.namespace.to_string(),
        meta.name.to_string(),
    )
}

/// Builds a model from `set` with `build`. `unread` is what the sources
/// could not read now; `last` is the set accepted by the previous load.
pub fn accept(
    mut set: Vec<(Meta, Resource)>,
    unread: &[Unread],
    last: &[(Meta, Resource)],
    build: impl Fn(&ConfigSet) -> Result<Model, Vec<String>>,
) -> Result<Accepted, Vec<String>> {
    let mut errors: Vec<String> = Vec::new();
    for u in unread {
        errors.push(u.error.clone());
        set.extend(last.iter().filter(|(m, r)| u.covers(m, r)).cloned());
    }
    let mut fell_back: BTreeSet<Key> = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        let config = ConfigSet { resources: set };
        let found = match build(&config) {
            Ok(model) => {
                return Ok(Accepted {
                    model,
                    resources: config.resources,
                    errors,
                });
            }
            Err(found) => found,
        };
        let mut attributed = vec![false; found.len()];
        let mut next = Vec::with_capacity(config.resources.len());
        for (meta, res) in config.resources {
            let name = at(&meta, res.kind());
            let mut bad = false;
            for (i, e) in found.iter().enumerate() {
                if e.strip_prefix(&name)
                    .is_some_and(|rest| rest.starts_with(':'))
                {
                    attributed[i] = true;
                    bad = true;
                    if !errors.contains(e) {
                        errors.push(e.clone());
                    }
                }
            }
            if !bad {
                next.push((meta, res));
                continue;
            }
            // The last accepted version stands in, once; else nothing does.
            let k = key(&meta, &res);
            if fell_back.insert(k.clone())
                && let Some(prev) = last.iter().find(|(m, r)| key(m, r) == k)
                && prev != &(meta, res)
            {
                next.push(prev.clone());
            }
        }
        if attributed.contains(&false) {
            // Say what could not be read too, not only the model's errors.
            errors.retain(|e| !found.contains(e));
            errors.extend(found);
            return Err(errors);
        }
        set = next;
    }
    Err(errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(file: &str, text: &str) -> Vec<(Meta, Resource)> {
        crate::store::parse_file(Path::new(file), text).unwrap()
    }

    fn build(set: &ConfigSet) -> Result<Model, Vec<String>> {
        Model::build(set, "cluster.local")
    }

    const SERVICES: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  ports: [{number: 9080, name: http}]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  ports: [{number: 9080, name: http}]\n";

    fn deny(path: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny}}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {{paths: [\"{path}\"]}}\n"
        )
    }

    #[test]
    fn a_name_defined_twice_keeps_the_first_and_rejects_the_second_saying_where() {
        let route = |subset_host: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings}}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - destination: {{host: {subset_host}}}\n"
            )
        };
        let set = [
            parse("svc.yaml", SERVICES),
            parse("a.yaml", &route("ratings")),
            parse("b.yaml", &route("reviews")),
        ]
        .concat();
        let loaded = accept(set, &[], &[], build).unwrap();
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        assert!(
            loaded.errors[0].starts_with(
                "b.yaml: VirtualService default/ratings: the name is taken by the VirtualService in a.yaml"
            ),
            "{:?}",
            loaded.errors
        );
        let routes = &loaded.model.routes["ratings.default.svc.cluster.local"];
        assert_eq!(routes.len(), 1);
        assert_eq!(
            routes[0].http[0].route[0].destination.host, "ratings.default.svc.cluster.local",
            "a.yaml's route applies"
        );
        // Twice in one file: said so; a ServiceEntry of the same name is no clash.
        let twice = format!("{}---\n{}", route("ratings"), route("reviews"));
        let loaded = accept(
            [parse("svc.yaml", SERVICES), parse("vs.yaml", &twice)].concat(),
            &[],
            &[],
            build,
        )
        .unwrap();
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        assert!(
            loaded.errors[0]
                .contains("the name is taken by the VirtualService earlier in the same file"),
            "{:?}",
            loaded.errors
        );
        // Both stand at one place (file, kind, name), so neither applies;
        // the version accepted last time would stand in, as for any bad resource.
        assert!(
            !loaded
                .model
                .routes
                .contains_key("ratings.default.svc.cluster.local")
        );
    }

    #[test]
    fn a_bad_resource_is_rejected_alone_and_its_last_good_version_stands_in() {
        let first = [
            parse("svc.yaml", SERVICES),
            parse("deny.yaml", &deny("/admin")),
        ]
        .concat();
        let good = accept(first, &[], &[], build).unwrap();
        assert!(good.errors.is_empty());
        assert_eq!(good.model.authz.len(), 1);

        // The DENY is broken by an update (a bad IP block) while a new
        // route arrives in another file: the route applies, the old DENY
        // keeps enforcing, and the error names the policy.
        let broken = deny("/admin").replace(
            "  - to:",
            "  - from:\n    - source: {ipBlocks: [\"10.0.0.0/33\"]}\n    to:",
        );
        let route = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - destination: {host: ratings}\n";
        let second = [
            parse("svc.yaml", SERVICES),
            parse("deny.yaml", &broken),
            parse("vs.yaml", route),
        ]
        .concat();
        let next = accept(second, &[], &good.resources, build).unwrap();
        assert_eq!(next.errors.len(), 1, "{:?}", next.errors);
        assert!(
            next.errors[0].starts_with("deny.yaml: AuthorizationPolicy default/deny:"),
            "{:?}",
            next.errors
        );
        assert!(
            next.model
                .routes
                .contains_key("ratings.default.svc.cluster.local")
        );
        assert_eq!(next.model.authz.len(), 1, "the old DENY still enforces");
        assert_eq!(next.model.authz, good.model.authz);
    }

    #[test]
    fn a_resource_that_no_longer_fits_is_dropped_and_an_unreadable_file_keeps_its_last_resources() {
        let route = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - destination: {host: ratings}\n";
        let first = [
            parse("svc.yaml", SERVICES),
            parse("vs.yaml", route),
            parse("deny.yaml", &deny("/admin")),
        ]
        .concat();
        let good = accept(first, &[], &[], build).unwrap();

        // ratings goes away while its route stays: the route is dropped
        // (its last version names ratings too) and reviews still serves.
        let only_reviews = SERVICES.split("---").next().unwrap();
        let unread = Unread {
            file: "deny.yaml".into(),
            object: None,
            error: "deny.yaml: not valid YAML: ...".into(),
        };
        let second = [parse("svc.yaml", only_reviews), parse("vs.yaml", route)].concat();
        let next = accept(
            second,
            std::slice::from_ref(&unread),
            &good.resources,
            build,
        )
        .unwrap();
        assert!(
            next.model
                .services
                .contains_key("reviews.default.svc.cluster.local")
        );
        assert!(next.model.routes.is_empty());
        assert!(
            next.errors
                .iter()
                .any(|e| e.starts_with("vs.yaml: VirtualService default/ratings:")),
            "{:?}",
            next.errors
        );
        // The unreadable file's policy kept its last accepted version.
        assert!(next.errors.contains(&unread.error));
        assert_eq!(next.model.authz, good.model.authz);
    }

    #[test]
    fn an_error_that_names_no_resource_rejects_the_whole_load() {
        let set = parse("svc.yaml", SERVICES);
        let unread = Unread {
            file: "deny.yaml".into(),
            object: None,
            error: "deny.yaml: not valid YAML: ...".into(),
        };
        let err = accept(set, &[unread], &[], |_| {
            Err(vec!["something mesh-wide".to_string()])
        })
        .unwrap_err();
        assert_eq!(
            err,
            ["deny.yaml: not valid YAML: ...", "something mesh-wide"]
        );
    }
}

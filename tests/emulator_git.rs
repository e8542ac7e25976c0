//! `token-broker emulator --git-root`: the real `git` binary clones,
//! fetches and pushes over smart HTTP with a PAT, and is refused (401 with a
//! Basic challenge) without one, with one of another organization, too
//! narrow a scope, or a revoked one.

mod common;

// Tests run git (blocking) on the test's own thread: the emulator serves
// from the runtime's workers meanwhile.

use token_broker::emulator::EmulatorConfig;

use common::emulator::Emu;
use common::git::{path, repo_url, GitWorld, ORG};

/// An emulator serving `world`'s git root, seeded with one repository.
async fn emulator(world: &GitWorld) -> Emu {
    world.seed();
    Emu::start(EmulatorConfig {
        git_root: Some(world.root()),
        ..EmulatorConfig::default()
    })
    .await
}

/// The repository URL with `pat` as the Basic password (user `pat`).
fn url_with(emu: &Emu, pat: &str) -> String {
    repo_url(&emu.running.url()).replace("http://", &format!("http://pat:{pat}@"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_with_a_read_pat_and_pushes_only_with_a_write_pat() {
    let world = GitWorld::new();
    let emu = emulator(&world).await;
    let bare = world.root().join("fabrikam/Fiber/app.git");
    let bearer = emu.user_bearer().await;
    let (_, read) = emu.create_pat(&bearer, ORG, "read", "vso.code", 1).await;
    let (_, write) = emu
        .create_pat(&bearer, ORG, "write", "vso.code_write", 1)
        .await;

    let clone = world.work().join("clone");
    let out = world.git(
        &world.work(),
        &["clone", &url_with(&emu, &read), path(&clone)],
    );
    world.ok(&out);
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "hello\n"
    );

    std::fs::write(clone.join("NEW"), "pushed\n").unwrap();
    world.ok(&world.git(&clone, &["add", "NEW"]));
    world.ok(&world.git(&clone, &["commit", "-m", "second"]));
    let before = world.rev(&bare, "main");
    // vso.code does not cover vso.code_write: refused, nothing changes.
    let out = world.git(&clone, &["push", "origin", "main"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") || stderr.contains("Authentication failed"),
        "{stderr}"
    );
    assert!(!stderr.contains(&read), "git printed the PAT: {stderr}");
    assert_eq!(world.rev(&bare, "main"), before);

    let out = world.git(&clone, &["push", &url_with(&emu, &write), "main"]);
    world.ok(&out);
    assert_eq!(world.rev(&bare, "main"), world.rev(&clone, "HEAD"));

    // vso.code_write covers vso.code: it fetches too.
    let again = world.work().join("again");
    world.ok(&world.git(
        &world.work(),
        &["clone", &url_with(&emu, &write), path(&again)],
    ));
    assert_eq!(
        std::fs::read_to_string(again.join("NEW")).unwrap(),
        "pushed\n"
    );
    assert!(emu.stats().await["calls"]["dataplane"].as_u64().unwrap() >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_401_with_a_basic_challenge_and_unknown_repositories_404() {
    let world = GitWorld::new();
    let emu = emulator(&world).await;
    let bearer = emu.user_bearer().await;
    let (id, pat) = emu.create_pat(&bearer, ORG, "read", "vso.code", 1).await;
    let (_, other_org) = emu
        .create_pat(&bearer, "contoso", "other", "vso.code", 1)
        .await;
    let (_, packaging) = emu
        .create_pat(&bearer, ORG, "packaging", "vso.packaging", 1)
        .await;
    let refs = format!(
        "{}/info/refs?service=git-upload-pack",
        repo_url(&emu.running.url())
    );
    let get = |pat: Option<&str>, url: &str| {
        let mut req = emu.http.get(url);
        if let Some(pat) = pat {
            req = req.basic_auth("", Some(pat));
        }
        req.send()
    };

    let ok = get(Some(&pat), &refs).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["content-type"],
        "application/x-git-upload-pack-advertisement"
    );

    for (what, credential) in [
        ("no credential", None),
        ("another organization's PAT", Some(other_org.as_str())),
        ("a PAT without vso.code", Some(packaging.as_str())),
        ("an unknown PAT", Some("not-a-pat")),
    ] {
        let resp = get(credential, &refs).await.unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        let challenges: Vec<_> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(
            challenges.iter().any(|c| c.starts_with("Basic realm=")),
            "{what}: {challenges:?}"
        );
    }
    // Pushing needs vso.code_write.
    let push_refs = refs.replace("git-upload-pack", "git-receive-pack");
    assert_eq!(get(Some(&pat), &push_refs).await.unwrap().status(), 401);

    // A repository that does not exist, asked with a good PAT: 404.
    let missing = refs.replace("/_git/app/", "/_git/nope/");
    assert_eq!(get(Some(&pat), &missing).await.unwrap().status(), 404);

    // Revoked at the emulator: refused from then on.
    let resp = emu
        .http
        .delete(emu.pats_url(
            ORG,
            &format!("authorizationId={id}&api-version=7.1-preview.1"),
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(get(Some(&pat), &refs).await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_git_root_the_git_paths_are_not_found() {
    let world = GitWorld::new();
    world.seed();
    let emu = Emu::start_default().await;
    let resp = emu
        .http
        .get(format!(
            "{}/info/refs?service=git-upload-pack",
            repo_url(&emu.running.url())
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

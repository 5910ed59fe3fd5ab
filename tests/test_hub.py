"""Push to and load from the Hub, against a local HTTP server standing in for it (no network).

`FakeHub` implements what huggingface_hub calls: create_repo, create_branch, validate-yaml, preupload
and commit (regular files only, base64 in ndjson) to push; model info, tree and file resolve to download.
The token never shows up in a file, a log line, stdout/stderr or an error; a failed push leaves the
folder as it was; loading refuses pickles unless asked.
"""

import base64
import hashlib
import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, constants

from latent_dit import cli
from latent_dit.components import load_pipeline
from latent_dit.config import Config, to_yaml
from latent_dit.hub import (
    CheckpointPusher,
    HubError,
    UnsafeWeightsError,
    check_can_push,
    prepare_for_hub,
    push_after_training,
    push_pipeline,
)
from latent_dit.pipelines import LatentDiTPipeline

TOKEN = "hf_testTOKEN123"
REPO = "me/tiny-dit"


class FakeHub:
    """A threaded HTTP server that keeps pushed files in memory: repos[repo][branch][path] = bytes."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.private: dict[str, bool] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.fail_with: int | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def files(self, repo=REPO, branch="main") -> dict[str, bytes]:
        return self.repos.get(repo, {}).get(branch, {})

    def repo_requests(self) -> list[tuple[str, str, str | None]]:
        """Requests about repos (huggingface_hub also asks the endpoint for telemetry settings, without a token)."""
        return [r for r in self.requests if r[1].startswith(("/api/repos", "/api/models", "/me/"))]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def reply(self, status, body=b"", headers=None, send_body=True):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def error(self, status, code, message):
                self.reply(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def handle_any(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urlsplit(self.path).path
                hub.requests.append((method, path, self.headers.get("Authorization")))
                if hub.fail_with:
                    return self.reply(hub.fail_with, {"error": "the fake Hub is down"})
                parts = [unquote(p) for p in path.strip("/").split("/")]
                if method == "POST" and path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}"
                    if repo in hub.repos:  # the Hub's 409 also carries the url, which create_repo(exist_ok=True) reads
                        return self.reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    hub.repos[repo] = {"main": {}}
                    hub.private[repo] = payload.get("visibility") == "private"
                    return self.reply(200, {"url": f"{hub.url}/{repo}"})
                if method == "POST" and path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) == 4 and method == "GET":
                    parts += ["revision", "main"]  # model_info without a revision
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                    if repo not in hub.repos:
                        return self.error(404, "RepoNotFound", f"Repository {repo} not found")
                    branches = hub.repos[repo]
                    revision = self.branch_of(repo, revision)
                    if action == "branch":
                        if revision in branches:
                            return self.error(409, "BranchExists", "Reference already exists")
                        branches[revision] = dict(branches["main"])
                        return self.reply(200, {})
                    if revision not in branches:
                        return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                branches[revision][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            elif item["key"] != "header":
                                return self.error(400, "BadRequest", f"unsupported commit item {item['key']}")
                        return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{self.sha(repo, revision)}",
                                                "commitOid": self.sha(repo, revision)})
                    if action == "tree" and method == "GET":  # one page, recursive
                        files = branches[revision]
                        return self.reply(200, [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                                                for name, content in sorted(files.items())])
                    if action == "revision" and method == "GET":
                        siblings = [{"rfilename": name} for name in sorted(branches[revision])]
                        return self.reply(200, {"id": repo, "sha": self.sha(repo, revision), "siblings": siblings, "private": False})
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, revision, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                    if repo not in hub.repos:
                        return self.error(404, "RepoNotFound", f"Repository {repo} not found")
                    revision = self.branch_of(repo, revision)
                    content = hub.repos[repo].get(revision, {}).get(name)
                    if content is None:
                        return self.error(404, "EntryNotFound", f"{name} does not exist on {revision}")
                    headers = {"X-Repo-Commit": self.sha(repo, revision), "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}
                    return self.reply(200, content, headers, send_body=method == "GET")
                return self.error(404, "EntryNotFound", f"the fake Hub does not implement {method} {path}")

            def branch_of(self, repo, revision):
                """A branch name, or the branch whose current commit hash `revision` is."""
                matches = [b for b in hub.repos[repo] if self.sha(repo, b) == revision]
                return matches[0] if revision not in hub.repos[repo] and matches else revision

            @staticmethod
            def sha(repo, revision):
                files = hub.repos[repo][revision]
                return hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()

            def do_GET(self):
                self.handle_any("GET")

            def do_HEAD(self):
                self.handle_any("HEAD")

            def do_POST(self):
                self.handle_any("POST")

        return Handler


def serve_as_the_hub(monkeypatch, fake: FakeHub, tmp_path: Path):
    """In this process: `fake` as HF_ENDPOINT (huggingface_hub reads it at import), online, a (fake) token in
    HF_TOKEN and none stored, an empty cache."""
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub()
    serve_as_the_hub(monkeypatch, fake, tmp_path)
    yield fake
    fake.server.shutdown()


@pytest.fixture(scope="module")
def prepared(tiny_pipeline_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub") / "pipeline"
    shutil.copytree(tiny_pipeline_dir, path)
    cfg = Config()
    cfg.train.validation_prompts, cfg.train.validation_steps = ["a red circle"], 2
    (path / "training_config.yaml").write_text(to_yaml(cfg))
    return prepare_for_hub(path)


@pytest.fixture
def folder(prepared, tmp_path) -> Path:
    """A shareable tiny pipeline folder, as the end-of-training export leaves it (a fresh copy per test)."""
    return Path(shutil.copytree(prepared, tmp_path / "pipeline"))


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_token(*texts):
    for text in texts:
        assert TOKEN not in (text.decode(errors="replace") if isinstance(text, bytes) else str(text))


# --- push ---------------------------------------------------------------------------------------------------


def test_cli_push_uploads_the_whole_folder_without_leaking_the_token(hub, folder, capfd, caplog):
    before = digest(folder)
    caplog.set_level(logging.DEBUG)
    cli.main(["push", str(folder), "--repo", REPO, "--private", "--commit-message", "first"])
    out, err = capfd.readouterr()
    assert f"{hub.url}/{REPO}/commit/" in out

    uploaded = hub.files()
    # Every file arrives; the card and snippet name the repo now (the local folder still says the placeholder).
    assert set(uploaded) == set(before)
    assert all(uploaded[name] == (folder / name).read_bytes() for name in before if name != "README.md")
    assert ModelCard(uploaded["README.md"].decode()).data.library_name == "diffusers"
    assert f'DiffusionPipeline.from_pretrained("{REPO}", trust_remote_code=True)' in uploaded["README.md"].decode()
    assert json.loads(uploaded["model_index.json"])["_class_name"] == ["pipeline_latent_dit", "LatentDiTPipeline"]
    assert hub.private[REPO] is True
    # The token authenticated every call, and went nowhere else.
    assert hub.repo_requests() and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.repo_requests())
    assert_no_token(out, err, caplog.text, *uploaded.values())
    assert digest(folder) == before  # pushing never modifies the folder


def test_push_to_a_branch_creates_it(hub, folder):
    push_pipeline(folder, REPO, revision="dev")
    assert set(hub.files(branch="dev")) >= {"model_index.json", "README.md", "transformer/modeling_latent_dit.py"}
    assert hub.files(branch="main") == {}


def test_pipe_push_to_hub_shares_the_full_folder(hub, tiny_pipe):
    tiny_pipe.push_to_hub(REPO)
    uploaded = hub.files()
    assert {"README.md", "samples.png", "samples.txt", "pipeline_latent_dit.py", "transformer/modeling_latent_dit.py",
            "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(uploaded)
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.pipeline_tag == "text-to-image" and REPO in card.text
    assert not any(name.endswith((".bin", ".pt", ".ckpt", ".pkl")) for name in uploaded)
    with pytest.raises(ValueError, match="safetensors"):
        tiny_pipe.push_to_hub(REPO, safe_serialization=False)


def test_no_token_fails_clearly_before_any_request(hub, folder, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    before = digest(folder)
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["push", str(folder), "--repo", REPO])
    assert "No Hugging Face token" in str(excinfo.value.code) and "HF_TOKEN" in str(excinfo.value.code)
    assert hub.repo_requests() == [] and digest(folder) == before


def test_offline_mode_fails_clearly(hub, folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_pipeline(folder, REPO)
    assert hub.repo_requests() == []


@pytest.mark.parametrize("failure", ["http-500", "closed-port"])
def test_a_failing_hub_gives_a_clear_error_and_keeps_the_folder(hub, folder, monkeypatch, failure, caplog):
    caplog.set_level(logging.DEBUG)
    if failure == "http-500":
        hub.fail_with = 500
        expected = "HTTP 500"
    else:
        hub.server.shutdown()
        hub.server.server_close()
        expected = "could not reach"
    before = digest(folder)
    with pytest.raises(HubError) as excinfo:
        push_pipeline(folder, REPO)
    message = str(excinfo.value)
    assert expected in message and REPO in message and "unchanged" in message
    assert_no_token(message, repr(excinfo.value), caplog.text)
    assert digest(folder) == before


def test_a_file_holding_the_token_is_not_pushed(hub, folder):
    (folder / "notes.txt").write_text(f"my token is {TOKEN}\n")
    with pytest.raises(HubError, match="notes.txt contains your Hugging Face token") as excinfo:
        push_pipeline(folder, REPO)
    assert_no_token(str(excinfo.value))
    assert hub.repo_requests() == []


def test_pickles_are_never_pushed(hub, folder):
    (folder / "transformer" / "extra.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeWeightsError, match="extra.ckpt"):
        push_pipeline(folder, REPO)
    assert hub.repo_requests() == []


# --- training: end-of-run push and background checkpoint pushes ---------------------------------------------------


def test_failed_push_after_training_keeps_the_model_and_says_how_to_retry(hub, folder, caplog):
    hub.fail_with = 503
    before = digest(folder)
    assert push_after_training(folder, REPO) is None
    assert f"latent-dit push {folder} --repo {REPO}" in caplog.text
    assert digest(folder) == before
    hub.fail_with = None
    assert push_after_training(folder, REPO).startswith(f"{hub.url}/{REPO}/commit/")


def test_check_can_push_needs_a_repo_and_a_token(hub, monkeypatch):
    check_can_push(REPO)
    with pytest.raises(HubError, match="hub_repo"):
        check_can_push(None)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="token"):
        check_can_push(REPO)


def test_checkpoints_go_to_a_branch_in_the_background(hub, tmp_path, caplog):
    checkpoint = tmp_path / "checkpoints" / "checkpoint-0000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "config.yaml").write_text("train: {}\n")
    pusher = CheckpointPusher(REPO)
    pusher.submit(checkpoint)
    pusher.submit(tmp_path / "checkpoints" / "checkpoint-0000020")  # pruned before its upload: a warning, no error
    pusher.close()
    assert hub.files(branch="checkpoints") == {"checkpoint-0000010/model.safetensors": b"weights",
                                                "checkpoint-0000010/config.yaml": b"train: {}\n"}
    assert hub.private[REPO] is True and pusher.pushed == ["checkpoint-0000010"]
    assert "checkpoint-0000020 was not pushed" in caplog.text


def test_training_pushes_its_export_at_the_end(hub, tmp_path, monkeypatch):
    from training_helpers import make_components, make_sidecar_folder, tiny_config

    from latent_dit.train import main

    cfg = tiny_config(make_sidecar_folder(tmp_path / "data"), tmp_path / "run", make_components(tmp_path / "parts"),
                      ["train.max_steps=2", "train.checkpoint_every=1", "train.push_to_hub=true", f"train.hub_repo={REPO}",
                       "train.push_checkpoints=true"])
    summary = main(cfg)
    pipeline_dir = Path(summary["pipeline"])
    assert set(hub.files()) == set(digest(pipeline_dir))
    assert {"README.md", "pipeline_latent_dit.py", "training_config.yaml", "samples.png"} <= set(hub.files())
    assert {name.split("/")[0] for name in hub.files(branch="checkpoints")} == {"checkpoint-0000001", "checkpoint-0000002"}
    assert f'"{REPO}"' in (pipeline_dir / "README.md").read_text()  # the export already knew the repo


# --- load ---------------------------------------------------------------------------------------------------


def test_load_from_the_hub_through_the_cache_then_offline(hub, folder, monkeypatch):
    push_pipeline(folder, REPO)
    pipe = load_pipeline(REPO)
    assert type(pipe) is LatentDiTPipeline
    reference = LatentDiTPipeline.from_pretrained(folder)
    for name in ("transformer", "vae", "text_encoder"):
        for a, b in zip(getattr(pipe, name).state_dict().values(), getattr(reference, name).state_dict().values()):
            assert torch.equal(a, b)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # from the cache now, no request
    count = len(hub.repo_requests())
    assert type(load_pipeline(REPO)) is LatentDiTPipeline and len(hub.repo_requests()) == count


def test_missing_repo_is_named(hub):
    with pytest.raises(FileNotFoundError, match="'me/no-such-model' was not found"):
        load_pipeline("me/no-such-model")


def test_missing_repo_offline_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'me/not-cached'.*HF_HUB_OFFLINE"):
        load_pipeline("me/not-cached")


def test_loading_refuses_pickles_unless_asked(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(UnsafeWeightsError, match=r"diffusion_pytorch_model\.bin.*allow_pickle=True"):
        load_pipeline(str(tmp_path))
    assert type(load_pipeline(str(tmp_path), allow_pickle=True)) is LatentDiTPipeline


def test_a_stray_pickle_beside_safetensors_is_refused(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    (folder / "transformer" / "ema.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeWeightsError, match="ema.ckpt"):
        load_pipeline(str(folder))

"""Sharing on the Hugging Face Hub: the shareable folder, `latent-dit push`, and loading without pickles.

`prepare_for_hub(folder)` completes a pipeline folder written by `pipe.save_pretrained` (or by the
end-of-training export) so that anyone can load it:

- `README.md`: the model card (see `model_card.py`);
- `pipeline_latent_dit.py` and `transformer/modeling_latent_dit.py`: copies of latent-dit's pipeline and
  model code, which import only torch and diffusers;
- `model_index.json` names them the way diffusers looks for custom code:
  `"_class_name": ["pipeline_latent_dit", "LatentDiTPipeline"]` (a pipeline file at the root) and
  `"transformer": ["modeling_latent_dit", "LatentDiTTransformer2DModel"]` (a file in the component folder).

Plain diffusers runs those files only with `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`.
With latent-dit installed, `connect_to_diffusers()` (run by `import latent_dit`) makes diffusers take the
installed classes for those two files instead, so the same folder loads with no remote code at all.

`push_pipeline` uploads a folder in one commit (`create_repo` + `create_commit`) and never modifies
it: the files `prepare_for_hub` would write are computed in memory. The token comes from `HF_TOKEN` or
`hf auth login`; it is never printed, logged, or written into a file or an error message.
"""

import functools
import json
import logging
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

from .model_card import GENERATED_MARKER, render_model_card

logger = logging.getLogger(__name__)

PIPELINE_MODULE = "pipeline_latent_dit"  # <folder>/pipeline_latent_dit.py
MODEL_MODULE = "modeling_latent_dit"  # <folder>/transformer/modeling_latent_dit.py
PIPELINE_CLASS = "LatentDiTPipeline"
MODEL_CLASS = "LatentDiTTransformer2DModel"
# Weight formats that unpickle, and so can run arbitrary code, when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files looked through for the token before a push; weights are too big to matter and never hold text.
_TEXT_SCAN_LIMIT = 8 * 2**20


class HubError(RuntimeError):
    """A push that could not happen; the message says why and what to do. It never contains the token."""


class UnsafeWeightsError(ValueError):
    """A folder holds pickled weights and the caller did not opt in to loading them."""


# --- latent-dit inside diffusers ---------------------------------------------------------------------------


def _installed_class(module_file: str, class_name: str | None):
    """The installed class that a shipped code file holds, or None for any other file."""
    name = Path(module_file).name
    if name == f"{PIPELINE_MODULE}.py" and class_name in (None, PIPELINE_CLASS):
        from .pipelines import LatentDiTPipeline

        return LatentDiTPipeline
    if name == f"{MODEL_MODULE}.py" and class_name == MODEL_CLASS:
        from .model import LatentDiTTransformer2DModel

        return LatentDiTTransformer2DModel
    return None


def connect_to_diffusers():
    """Run by `import latent_dit`: diffusers uses the installed classes for a folder's copies of our code
    (no `trust_remote_code` needed, nothing from the folder runs), and `pipe.push_to_hub` shares the full
    folder (`push_to_hub` below)."""
    from diffusers.pipelines import pipeline_loading_utils

    from .pipelines import LatentDiTPipeline

    # Both custom pipelines and custom components resolve through this one function (diffusers 0.3x-0.4x).
    original = getattr(pipeline_loading_utils, "get_class_from_dynamic_module", None)
    if original is not None and not getattr(original, "uses_installed_latent_dit", False):

        @functools.wraps(original)
        def get_class_from_dynamic_module(pretrained_model_name_or_path, module_file, *args, class_name=None, **kwargs):
            installed = _installed_class(module_file, class_name)
            if installed is not None:
                return installed
            return original(pretrained_model_name_or_path, module_file, *args, class_name=class_name, **kwargs)

        get_class_from_dynamic_module.uses_installed_latent_dit = True
        pipeline_loading_utils.get_class_from_dynamic_module = get_class_from_dynamic_module
    LatentDiTPipeline.push_to_hub = push_to_hub


def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                variant: str | None = None, subfolder: str | None = None) -> str:
    """`LatentDiTPipeline.push_to_hub`: diffusers' signature, and the folder `latent-dit push` shares
    (model card with samples drawn by this pipeline, code for plain diffusers, safetensors only)."""
    if not safe_serialization:
        raise ValueError("latent-dit shares safetensors weights only; leave safe_serialization=True.")
    if subfolder:
        raise ValueError("push_to_hub(subfolder=...) is not supported for a whole pipeline; push to the repo root.")
    with tempfile.TemporaryDirectory(prefix="latent-dit-push-") as folder:
        self.save_pretrained(folder, safe_serialization=True, variant=variant)
        prepare_for_hub(folder, repo_id=repo_id, pipe=self)
        return push_pipeline(folder, repo_id, private=private, token=token, commit_message=commit_message, create_pr=create_pr)


# --- the shareable folder ----------------------------------------------------------------------------------


def find_pickles(folder: str | Path) -> list[str]:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def check_no_pickles(folder: str | Path, allow_pickle: bool = False):
    """Raise `UnsafeWeightsError` naming the pickled files in `folder`, unless `allow_pickle`."""
    pickles = find_pickles(folder)
    if pickles and not allow_pickle:
        raise UnsafeWeightsError(
            f"{folder} holds pickled files ({', '.join(pickles)}). Loading a pickle can run arbitrary code, so "
            "latent-dit loads safetensors weights only. If you trust where these files come from, opt in with "
            "load_pipeline(..., allow_pickle=True), or convert them to safetensors."
        )


def read_pipeline_index(pipeline_dir: Path) -> dict:
    """model_index.json of a latent-dit pipeline folder; a clear error for anything else."""
    index_path = pipeline_dir / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{pipeline_dir} has no model_index.json: pass a folder written by `pipe.save_pretrained` or `latent-dit train`.")
    index = json.loads(index_path.read_text())
    transformer_class = (index.get("transformer") or [None, None])[1]
    if transformer_class != MODEL_CLASS:
        raise ValueError(f"{pipeline_dir} is not a latent-dit pipeline: its transformer is {transformer_class!r}, not {MODEL_CLASS!r}.")
    return index


def _source(module) -> str:
    return Path(module.__file__).read_text()


def shareable_files(pipeline_dir: str | Path, *, repo_id: str | None = None, base_model: str | None = None,
                    datasets: list[str] | str | None = None, license: str | None = None) -> dict[str, bytes]:
    """What `prepare_for_hub` writes into `pipeline_dir`, by relative path: model_index.json, the two code
    files and README.md (left out when the folder has a hand-edited card, i.e. one without our marker)."""
    from . import model as model_module
    from .pipelines import pipeline_latent_dit as pipeline_module

    pipeline_dir = Path(pipeline_dir)
    index = read_pipeline_index(pipeline_dir)
    index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
    index["transformer"] = [MODEL_MODULE, MODEL_CLASS]
    files = {
        "model_index.json": json.dumps(index, indent=2, sort_keys=True) + "\n",  # as diffusers' save_config writes it
        f"{PIPELINE_MODULE}.py": _source(pipeline_module),
        f"transformer/{MODEL_MODULE}.py": _source(model_module),
    }
    readme = pipeline_dir / "README.md"
    if not readme.is_file() or GENERATED_MARKER in readme.read_text():
        files["README.md"] = render_model_card(pipeline_dir, repo_id=repo_id, base_model=base_model, datasets=datasets, license=license)
    else:
        logger.info("%s has no latent-dit marker (edited by hand): kept as it is.", readme)
    return {path: text.encode() for path, text in files.items()}


def write_samples(pipeline_dir: Path, pipe=None):
    """Draw the sample grid (samples.png + samples.txt) the way the end-of-training export does."""
    from .config import Config, ConfigError, load_config
    from .validation import image_grid, sample_validation_images

    try:  # the run's prompts, steps and guidance; the defaults for a folder from `pipe.save_pretrained`
        cfg = load_config(pipeline_dir / "training_config.yaml")
    except ConfigError:
        cfg = Config()
    if pipe is None:
        from .pipelines import LatentDiTPipeline

        pipe = LatentDiTPipeline.from_pretrained(pipeline_dir)
        pipe.set_progress_bar_config(disable=True)
    cfg.model.conditioning = pipe.transformer.config.conditioning
    images, titles = sample_validation_images(pipe, cfg)
    image_grid(images).save(pipeline_dir / "samples.png")
    (pipeline_dir / "samples.txt").write_text("\n".join(titles) + "\n")


def prepare_for_hub(pipeline_dir: str | Path, *, repo_id: str | None = None, base_model: str | None = None,
                    datasets: list[str] | str | None = None, license: str | None = None, pipe=None,
                    draw_samples: bool = True) -> Path:
    """Make a saved pipeline folder shareable, in place; running it again changes nothing.

    Adds the model card, the code plain diffusers needs, and a model_index.json that points at it (see
    the module docstring). `draw_samples`: when the folder has no samples.png, draw one with `pipe` (or
    the folder's own pipeline). `repo_id` goes into the card's usage snippet. `base_model`, `datasets`,
    `license`: Hub metadata (see `model_card.render_model_card`).
    """
    pipeline_dir = Path(pipeline_dir)
    read_pipeline_index(pipeline_dir)  # fails early on a folder that is not a latent-dit pipeline
    check_no_pickles(pipeline_dir)
    if draw_samples and not (pipeline_dir / "samples.png").is_file():
        write_samples(pipeline_dir, pipe)
    files = shareable_files(pipeline_dir, repo_id=repo_id, base_model=base_model, datasets=datasets, license=license)
    for relative, content in files.items():
        path = pipeline_dir / relative
        if not path.is_file() or path.read_bytes() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return pipeline_dir


# --- push --------------------------------------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str:
    """The token to push with: `token`, else HF_TOKEN, else the one `hf auth login` saved."""
    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it (or set HF_HUB_OFFLINE=0) to push.")
    token = token or get_token()
    if not token:
        raise HubError("No Hugging Face token found: set HF_TOKEN to a token with write access, or run `hf auth login`.")
    return token


def _folder_files(folder: Path) -> list[str]:
    """Relative paths of the files to upload: everything but hidden files and Python caches."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            files.append(relative.as_posix())
    return files


def _describe_error(error: Exception, endpoint: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", "?")
        hints = {401: "the token was refused: check HF_TOKEN or run `hf auth login`",
                 403: "the token may not write there: use a token with write access to that namespace"}
        detail = " ".join(str(error).split())[:400] or type(error).__name__
        return f"the Hub answered HTTP {status}" + (f" ({hints[status]})" if status in hints else "") + f": {detail}"
    if isinstance(error, OSError) or type(error).__module__.split(".")[0].startswith(("httpx", "httpcore")):
        return f"could not reach {endpoint} ({type(error).__name__}: {error}); check the network and HF_ENDPOINT"
    return f"{type(error).__name__}: {error}"


def _commit(folder: Path, repo_id: str, operations: list, *, token: str, private, revision, commit_message,
            create_pr: bool = False) -> str:
    """create_repo (+ create_branch) + create_commit; any failure becomes a `HubError` without the token."""
    api = HfApi(token=token)  # reads HF_ENDPOINT now, not at import
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr)
    except Exception as error:  # noqa: BLE001 - every failure gets the same clear message
        message = (f"Could not push {folder} to {repo_id}: {_describe_error(error, api.endpoint)}. "
                   f"The local folder {folder} is unchanged.")
        raise HubError(message.replace(token, "<token>")) from None
    return info.pr_url or info.commit_url


def push_pipeline(pipeline_dir: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                  commit_message: str | None = None, token: str | None = None, base_model: str | None = None,
                  datasets: list[str] | str | None = None, license: str | None = None, create_pr: bool = False) -> str:
    """Upload a pipeline folder, completed as `prepare_for_hub` would (in memory: the folder is not modified),
    to `repo_id` on branch `revision` (created when missing), in one commit. Returns the commit's URL."""
    pipeline_dir = Path(pipeline_dir)
    token = resolve_token(token)
    check_no_pickles(pipeline_dir)
    generated = shareable_files(pipeline_dir, repo_id=repo_id, base_model=base_model, datasets=datasets, license=license)
    if not (pipeline_dir / "samples.png").is_file():
        logger.warning("%s has no samples.png: the model card has no sample grid (prepare_for_hub draws one).", pipeline_dir)
    operations, secret = [], token.encode()
    for relative in sorted(set(_folder_files(pipeline_dir)) | set(generated)):
        path = pipeline_dir / relative
        content = generated.get(relative)
        if content is None and path.stat().st_size <= _TEXT_SCAN_LIMIT:
            content = path.read_bytes()
        if content is not None and secret in content:
            raise HubError(f"Refusing to push: {pipeline_dir / relative} contains your Hugging Face token. Remove it first.")
        source = generated[relative] if relative in generated else str(path)
        operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=source))
    url = _commit(pipeline_dir, repo_id, operations, token=token, private=private, revision=revision,
                  commit_message=commit_message or "Upload latent-dit pipeline", create_pr=create_pr)
    logger.info("Pushed %d files of %s to %s", len(operations), pipeline_dir, url)
    return url


# --- training: push the export, and checkpoints in the background -------------------------------------------


def check_can_push(repo_id: str | None):
    """Called before training with `push_to_hub: true`, so a missing repo name or token fails now, not hours later."""
    if not repo_id:
        raise HubError("train.push_to_hub is true but train.hub_repo is not set: set it to user/name.")
    resolve_token()


def push_after_training(pipeline_dir: Path, repo_id: str) -> str | None:
    """Push the exported pipeline; on failure, log why and how to push later. The folder is kept either way."""
    try:
        return push_pipeline(pipeline_dir, repo_id, commit_message="Upload latent-dit pipeline (end of training)")
    except Exception as error:  # noqa: BLE001 - the run is over and its export is saved: report, never crash
        logger.error("%s\nThe trained pipeline is safe in %s; push it later with: latent-dit push %s --repo %s",
                     error, pipeline_dir, pipeline_dir, repo_id)
        return None


class CheckpointPusher:
    """Uploads checkpoint folders to a branch of the Hub repo from one background thread: training never
    waits for an upload, and a failed upload is logged, never raised.

    A checkpoint is accelerate's full training state (it includes pickled optimizer and RNG states): it is
    for resuming, not for loading with diffusers. Uploads run one at a time; a checkpoint pruned by
    `keep_checkpoints` before its turn comes is skipped with a warning.
    """

    def __init__(self, repo_id: str, branch: str = "checkpoints", token: str | None = None):
        self.repo_id, self.branch, self._token = repo_id, branch, resolve_token(token)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-dit-push")
        self.pushed: list[str] = []

    def submit(self, checkpoint_dir: str | Path):
        return self._executor.submit(self._push, Path(checkpoint_dir))

    def _push(self, folder: Path):
        try:
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} no longer exists (pruned before its upload)")
            operations = [CommitOperationAdd(path_in_repo=f"{folder.name}/{relative}", path_or_fileobj=str(folder / relative))
                          for relative in _folder_files(folder)]
            # private=True applies only if this creates the repo: a repo made for checkpoints starts private.
            _commit(folder, self.repo_id, operations, token=self._token, private=True, revision=self.branch,
                    commit_message=f"Checkpoint {folder.name}")
            self.pushed.append(folder.name)
            logger.info("Pushed %s to %s (branch %s)", folder.name, self.repo_id, self.branch)
        except Exception as error:  # noqa: BLE001 - a backup upload must never stop training
            logger.warning("Checkpoint %s was not pushed (training goes on): %s", folder.name, error)

    def close(self):
        """Wait for the uploads already queued."""
        self._executor.shutdown(wait=True)


# --- `latent-dit push` -------------------------------------------------------------------------------------


def push_command(args) -> str:
    try:
        url = push_pipeline(
            args.pipeline_dir, args.repo, private=args.private or None, revision=args.revision,
            commit_message=args.commit_message, base_model=args.base_model, datasets=args.dataset or None,
            license=args.license,
        )
    except (HubError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"Pushed {args.pipeline_dir} to {url}")
    return url


def add_push_parser(subparsers):
    p = subparsers.add_parser(
        "push", help="Upload a pipeline folder to the Hugging Face Hub (with a model card and the code to load it).",
        description="Upload a pipeline folder to the Hugging Face Hub. The token comes from HF_TOKEN or `hf auth login`.",
    )
    p.add_argument("pipeline_dir", help="Folder written by `latent-dit train` (RUN/pipeline) or `pipe.save_pretrained`.")
    p.add_argument("--repo", required=True, help="Hub repo id, user/name (created if missing).")
    p.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps its visibility).")
    p.add_argument("--revision", default=None, help="Branch to push to (created if missing); default: main.")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--base-model", default=None, help="Hub id of the model this one was fine-tuned from (card metadata).")
    p.add_argument("--dataset", action="append", default=[], metavar="HUB_ID", help="Training dataset on the Hub (repeatable).")
    p.add_argument("--license", default=None, help="License id for the card, e.g. apache-2.0, mit, other.")
    p.set_defaults(func=push_command)
    return p


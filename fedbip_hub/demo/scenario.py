"""One federation run per method, through the real path, on the local-folder backend.

For every method: ``init_federation`` (a folder) → every client ``join``s → rounds of
``train_adapter`` (start "auto": the latest personalized adapter, else the initial one) →
``client.push`` → ``rounds.run_round`` (what ``fedbip-server run`` runs) → ... → each
client's final personalized adapter is pulled and scored on its own held-out test set.

All methods see the same clients, data, seeds and schedule. Round 1 starts every client
from the same initial adapter, so its uploads are the same for every method; they are
trained once and pushed to every federation (bit-identical to training them again).

"Late" clients exercise asynchrony: a client late in round r trains from its adapter as
it was before round r, misses round r (it is compared through its last task vector, and
contributes nothing new), and its upload lands in round r+1 one version stale.
"""

from __future__ import annotations

import copy
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedbip_hub.demo.base_model import BaseModelSpec, ensure_base_model
from fedbip_hub.demo.methods import Method
from fedbip_hub.demo.metrics import cosine_matrix, group_auc, separation
from fedbip_hub.demo.results import MethodResult, round_summary, similarity_summary
from fedbip_hub.demo.tasks import TASKS, ClientData, make_clients

MARKER = ".fedbip-demo"
LogFn = Callable[[str], None]
# (federation, client, round, trained adapter folder) -> the folder to push instead.
UploadHook = Callable[[Any, str, int, Path], Path]


@dataclass
class ScenarioConfig:
    """The federation every method runs.

    Attributes:
        groups: one task per client; clients are named ``<task>-<i>``.
        n_train: training examples per client (one number, or one per client).
        n_test: clean held-out test examples per client.
        label_noise: the fraction of training labels flipped.
        rounds: asynchronous rounds.
        late: round → clients whose upload of that round arrives one round late.
        epochs, learning_rate, batch_size: local training per round.
        lora_r, lora_alpha, target_modules, lora_dropout: the federation's LoRA.
        training_options: further ``TrainingArgs`` fields (schedule, warmup, ...).
        seed: data, initial adapter and training seeds all derive from it.
        base: the base model's architecture and pre-training.
    """

    groups: tuple[str, ...] = ("low", "low", "low", "even", "even", "marked", "marked")
    n_train: int | tuple[int, ...] = 64
    n_test: int = 200
    label_noise: float = 0.1
    rounds: int = 4
    late: dict[int, tuple[str, ...]] = field(
        default_factory=lambda: {2: ("low-2", "even-2")})
    epochs: float = 2
    learning_rate: float = 2.5e-3  # constant schedule: the same total step as linear at 5e-3
    batch_size: int = 16
    lora_r: int = 4
    lora_alpha: float = 8.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.05
    training_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    base: BaseModelSpec = field(default_factory=BaseModelSpec)

    def to_json(self) -> dict:
        data = asdict(self)
        data["late"] = {str(k): list(v) for k, v in self.late.items()}
        data["base"] = self.base.to_json()
        return data

    @property
    def majority_task(self) -> str:
        return max(self.groups, key=self.groups.count)  # ties: the first seen


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def prepare_dir(root: Path) -> Path:
    """The demo folder, with its previous federations removed (only if the demo wrote them)."""
    root.mkdir(parents=True, exist_ok=True)
    runs = root / "runs"
    if runs.exists():
        if not (runs / MARKER).is_file():
            from fedbip_hub.errors import ConfigError

            raise ConfigError(f"{runs} exists and was not written by `fedbip demo`.",
                              hint="Pick another --dir, or remove that folder.")
        shutil.rmtree(runs)
    runs.mkdir()
    (runs / MARKER).write_text("federations written by `fedbip demo`; safe to delete\n")
    return runs


class Scenario:
    """Runs the methods of a comparison on one scenario config.

    Args:
        config: the scenario.
        root: the demo folder (base model cache, federations, results).
        log: receives progress lines.
        upload_hook: optional; called with (federation, client, round, trained folder)
            before each fresh upload is pushed, it returns the folder to push instead (it
            must not modify the trained folder: round 1's is shared by every method).
            Used by benchmarks/bench_adversarial.py; the demo passes none.
    """

    def __init__(self, config: ScenarioConfig, root: str | Path, *, log: LogFn | None = None,
                 upload_hook: UploadHook | None = None):
        self.config = config
        self.root = Path(root)
        self.log = log or (lambda _msg: None)
        self.clients: list[ClientData] = self.make_clients()
        self.groups = {c.name: c.task for c in self.clients}
        majority = config.majority_task
        self.shifted = [c.name for c in self.clients if c.task != majority]
        self._datasets = {c.name: (c.train_dataset(), c.test_dataset()) for c in self.clients}
        self._first_round: dict[str, Path] = {}
        self.upload_hook = upload_hook
        self.base_model: Any = None
        self.base_info = None
        self.raw_similarity: dict | None = None
        self.unscored_if_missing: set[str] = set()  # benchmarks: attackers
        # benchmarks: per-client accuracy after each round, on the first
        # ``round_eval_examples`` test examples before the last round (None: all)
        self.evaluate_every_round = False
        self.round_eval_examples: int | None = None

    # -- set-up (subclasses swap the tasks and the base model) ---------------------------
    def make_clients(self) -> list[ClientData]:
        cfg = self.config
        return make_clients(cfg.groups, n_train=cfg.n_train, n_test=cfg.n_test,
                            label_noise=cfg.label_noise, seed=cfg.seed)

    def task_description(self, task: str) -> str:
        return TASKS[task].description

    def load_base(self, cache: Path | None = None) -> None:
        from transformers import AutoModelForSequenceClassification

        _quiet_transformers()
        self.base_info = ensure_base_model(cache or self.root / "base-model",
                                           self.config.base, log=self.log)
        self.base_model = AutoModelForSequenceClassification.from_pretrained(
            self.base_info.path, num_labels=2)
        self.base_model.eval()

    def _federation(self, runs: Path, method: Method):
        from fedbip_hub.federation.client import init_federation, join
        from fedbip_hub.federation.config import FederationConfig, LoraSpec

        cfg = self.config
        strategy = method.strategy
        if strategy.spec.weighting == "oracle" and strategy.groups is None:
            strategy = strategy.model_copy(update={"groups": dict(self.groups)})
        config = FederationConfig(
            name=f"demo-{method.label}", base_model=str(self.base_info.path.resolve()),
            task_type="SEQ_CLS", num_labels=2,
            lora=LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha,
                          target_modules=list(cfg.target_modules),
                          dropout=cfg.lora_dropout),
            strategy=strategy.model_dump(mode="json"), seed=cfg.seed)
        fed = init_federation(str(runs / method.label), config)
        for client in self.clients:
            join(fed, client.name)
        return fed

    def _training_args(self, client_index: int, round_index: int):
        from fedbip_hub.training.trainer import TrainingArgs

        cfg = self.config
        return TrainingArgs(epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                            batch_size=cfg.batch_size, device="cpu", precision="fp32",
                            seed=cfg.seed * 100_003 + round_index * 1_009 + client_index,
                            measure_examples=0, **cfg.training_options)

    def _train(self, fed, work: Path, index: int, client: ClientData, round_index: int
               ) -> Path:
        from fedbip_hub.training.trainer import train_adapter

        if round_index == 1 and client.name in self._first_round:
            return self._first_round[client.name]
        out = work / client.name / f"round-{round_index}"
        train_adapter(fed, client.name, self._datasets[client.name][0], out,
                      args=self._training_args(index, round_index), start="auto",
                      base_model=self.base_model, progress=False)
        if round_index == 1:
            self._first_round[client.name] = out
        return out

    # -- one method ----------------------------------------------------------------------
    def run_method(self, runs: Path, method: Method) -> MethodResult:
        from fedbip_hub.federation.client import push
        from fedbip_hub.server.rounds import run_round

        began = time.perf_counter()
        fed = self._federation(runs, method)
        work = runs / f"{method.label}-work"
        pending: dict[str, Path] = {}
        uploads: dict[int, dict[str, Path]] = {}
        records = []
        for r in range(1, self.config.rounds + 1):
            late = set(self.config.late.get(r, ()))
            pushed = uploads.setdefault(r, {})
            for index, client in enumerate(self.clients):
                if client.name in pending:  # last round's late upload lands now
                    pushed[client.name] = pending.pop(client.name)
                    push(fed, client.name, pushed[client.name])
                    continue
                folder = self._train(fed, work, index, client, r)
                if self.upload_hook is not None:
                    folder = self.upload_hook(fed, client.name, r, folder)
                if client.name in late and r < self.config.rounds:
                    pending[client.name] = folder
                else:
                    push(fed, client.name, folder)
                    pushed[client.name] = folder
            record = run_round(fed, groups=self.groups)
            records.append(round_summary(record, self.groups))
            if self.evaluate_every_round and r < self.config.rounds:
                records[-1]["accuracy"] = self._evaluate(
                    fed, runs / f"{method.label}-eval-{r}", limit=self.round_eval_examples)
            if r == 1 and self.raw_similarity is None:
                self.raw_similarity = self._raw_similarity(
                    [self._first_round[c.name] for c in self.clients])
        accuracy = self._evaluate(fed, runs / f"{method.label}-eval")
        if self.evaluate_every_round:
            records[-1]["accuracy"] = accuracy
        return MethodResult(method.label, method.strategy.model_dump(mode="json"),
                            accuracy, records, time.perf_counter() - began, uploads, fed)

    def cumulative_auc(self, result: MethodResult) -> list[float]:
        """Per round, the AUC of the uploads' cumulative task vectors (upload − initial
        adapter: everything the client's model has moved, not just this round's step).

        A diagnostic for the benchmark: the engine weighs by the round's own step."""
        from fedbip_hub.adapters.lora import LoraAdapter
        from fedbip_hub.engine.similarity import compute_similarity
        from fedbip_hub.engine.task_vectors import TaskVector

        init = LoraAdapter(result.federation.init_folder(), label="init")
        out = []
        for r in sorted(result.uploads):
            names = list(result.uploads[r])
            vectors = [TaskVector(LoraAdapter(result.uploads[r][n], label=n), init, name=n)
                       for n in names]
            cosine = compute_similarity(vectors).model_cosine()
            out.append(group_auc(cosine, [self.groups[n] for n in names]))
        return out

    def _peft(self, folder: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(copy.deepcopy(self.base_model), str(folder))

    def _evaluate(self, fed, dest: Path, limit: int | None = None) -> dict[str, float]:
        """Each client's accuracy on its own test set; a client of ``unscored_if_missing``
        without a personalized adapter (a guard excluded it in every round) is left out."""
        from fedbip_hub.errors import NotFoundError
        from fedbip_hub.federation.client import pull
        from fedbip_hub.training.evaluation import evaluate

        out = {}
        for client in self.clients:
            try:
                folder = pull(fed, client.name, dest / client.name).folder
            except NotFoundError:
                if client.name not in self.unscored_if_missing:
                    raise
                continue
            test = self._datasets[client.name][1]
            if limit is not None:
                test = test.select(range(min(limit, len(test))))
            scores = evaluate(self._peft(folder), test,
                              task_type="SEQ_CLS", batch_size=256, device="cpu")
            out[client.name] = float(scores["accuracy"])
        return out

    @torch.no_grad()
    def _raw_similarity(self, folders: Sequence[Path]) -> dict:
        """Cosines of the clients' full fine-tuned parameter vectors (base + ΔW, head)."""
        vectors = []
        for folder in folders:
            merged = self._peft(folder).merge_and_unload()
            vectors.append(torch.cat([p.detach().reshape(-1).double()
                                      for p in merged.state_dict().values()
                                      if p.is_floating_point()]))
        matrix = cosine_matrix(torch.stack(vectors))
        names = [c.name for c in self.clients]
        return {"clients": names, "cosine": matrix.tolist(),
                **separation(matrix, [self.groups[n] for n in names])}

    # -- all methods ---------------------------------------------------------------------
    def run(self, methods: Sequence[Method]) -> dict:
        with warnings.catch_warnings():
            # transformers' own deprecation notices, raised inside PEFT's save_pretrained
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            return self._run(methods)

    def _run(self, methods: Sequence[Method]) -> dict:
        began = time.perf_counter()
        runs = prepare_dir(self.root)
        if self.base_model is None:
            self.load_base()
        results = {}
        for method in methods:
            self.log(f"{method.label}: {len(self.clients)} clients, "
                     f"{self.config.rounds} rounds...")
            result = self.run_method(runs, method)
            results[method.label] = result.to_json(self.groups, self.shifted)
            self.log(f"{method.label}: mean accuracy {results[method.label]['accuracy']:.3f}"
                     f" ({result.seconds:.1f}s)")
        return {
            "config": self.config.to_json(),
            "clients": [{"name": c.name, "task": c.task, "n_train": len(c.train_labels),
                         "n_test": len(c.test_labels),
                         "task_description": self.task_description(c.task)}
                        for c in self.clients],
            "majority_task": self.config.majority_task,
            "task_shift_clients": self.shifted,
            "base_model": {"path": str(self.base_info.path), "reused": self.base_info.reused,
                           "pretrain_seconds": round(self.base_info.seconds, 2),
                           "pretrain_accuracy": self.base_info.pretrain_accuracy},
            "methods": results,
            "similarity": self.similarity_summary(results),
            "seconds": round(time.perf_counter() - began, 2),
        }

    def similarity_summary(self, results: Mapping[str, dict]) -> dict:
        """Task-vector AUC per round (of every similarity method) and the raw AUC."""
        return similarity_summary(results, self.raw_similarity)

"""How a training is made, besides its data and base: `Hyperparameters`, the one place their defaults, flags
and help live (`selfcorrect train` and `selfcorrect improve` take them as options generated from it). Imports
nothing heavy, so that the command line can read it without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import UserError


def _setting(default, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class Hyperparameters:
    epochs: float = _setting(1.0, "--epochs", "passes over the data")
    learning_rate: float = _setting(2e-4, "--lr", "learning rate (AdamW, decaying linearly to 0)")
    lora_r: int = _setting(16, "--lora-r", "LoRA rank")
    lora_alpha: int = _setting(32, "--lora-alpha", "LoRA alpha (the update is scaled by alpha / rank)")
    # 0: no random stream in the steps at all (with dropout it is seeded, and resumed)
    lora_dropout: float = _setting(0.0, "--lora-dropout", "LoRA dropout on the adapter's input")
    batch_size: int = _setting(8, "--batch-size", "rows per optimizer step (rl: episodes)")
    max_steps: int | None = _setting(None, "--max-steps", "stop after N steps, whatever --epochs says")
    seed: int = _setting(0, "--seed", "seed of the LoRA initialisation and the data order")
    # DPO's strength of the pull towards the reference; used for preference rows only
    beta: float = _setting(0.1, "--beta", "DPO beta, for preference rows: how closely to stay with the base")
    # On-policy correction RL (episode rows, train/rl.py); used for those only
    generations: int = _setting(8, "--generations", "rl: episodes sampled per question and step (the group whose "
                                "rewards are compared)")
    kl: float = _setting(0.0, "--kl", "rl: weight of the KL penalty towards the reference (the base, or the --init "
                         "adapter)")
    alpha: float = _setting(1.0, "--alpha", "rl: weight of the improvement bonus: attempt 2 earns r2 + alpha * (r2 - r1)")
    rollout_temperature: float = _setting(1.0, "--rollout-temperature", "rl: sampling temperature of the episodes")
    attempt_tokens: int = _setting(128, "--attempt-tokens", "rl: most tokens of each attempt")
    init: str | None = _setting(None, "--init", "rl: start from this trained adapter (lora:DIR) rather than a new one")
    # Not part of what the adapter is
    save_steps: int = _setting(20, "--save-steps", "steps between checkpoints (a killed run resumes there)")

    def check(self) -> None:
        for flag, value, low in (("--epochs", self.epochs, 0), ("--lr", self.learning_rate, 0),
                                 ("--lora-r", self.lora_r, 0), ("--lora-alpha", self.lora_alpha, 0),
                                 ("--batch-size", self.batch_size, 0), ("--save-steps", self.save_steps, 0)):
            if not value > low:
                raise UserError(f"{flag} {value}: must be above {low}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps {self.max_steps}: must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        if not self.beta > 0:
            raise UserError(f"--beta {self.beta}: must be above 0")
        if self.generations < 2:
            raise UserError(f"--generations {self.generations}: must be at least 2 (rewards are compared within a group)")
        for flag, value in (("--kl", self.kl), ("--alpha", self.alpha)):
            if not value >= 0:
                raise UserError(f"{flag} {value}: must be at least 0")
        if not 0 < self.rollout_temperature <= 2:
            raise UserError(f"--rollout-temperature {self.rollout_temperature}: must be above 0 and at most 2")
        if self.attempt_tokens < 1:
            raise UserError(f"--attempt-tokens {self.attempt_tokens}: must be at least 1")

    def check_for(self, row_format: str, rows: int | None = None) -> None:
        """Refuse settings that `rows` rows (when known) of `row_format` cannot take."""
        if row_format == "episode" and self.batch_size % self.generations:
            raise UserError(f"--batch-size {self.batch_size}: an rl step takes whole groups of episodes; give a "
                            f"multiple of --generations {self.generations}")
        questions = self.batch_size // self.generations
        if row_format == "episode" and rows is not None and rows < questions:
            raise UserError(f"--batch-size {self.batch_size}: an rl step takes {questions} questions "
                            f"({self.generations} episodes each) and the data has {rows}; give a smaller --batch-size "
                            "or more rows")
        if row_format != "episode" and self.init is not None:
            raise UserError(f"--init {self.init}: only rl training (episode rows) starts from a trained adapter")

    def shaping(self, row_format: str) -> dict:
        """The values the adapter depends on for rows of `row_format` (DPO's beta only for preference rows, the
        rl settings only for episode rows; never `save_steps`, since resuming from any checkpoint gives the same
        adapter)."""
        values = asdict(self)
        del values["save_steps"]
        if row_format != "preference":
            del values["beta"]
        if row_format != "episode":
            for name in RL_SETTINGS:
                del values[name]
        elif self.init is not None:  # trained on as it is: the init adapter's rank, alpha and dropout
            for name in ("lora_r", "lora_alpha", "lora_dropout"):
                del values[name]
        return values


RL_SETTINGS = ("generations", "kl", "alpha", "rollout_temperature", "attempt_tokens", "init")

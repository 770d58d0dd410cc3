"""The options of each search strategy: one small config dataclass per strategy.

Each strategy in `strategies/` names its config as `config_class`; `advsearch run` builds its
strategy options from these dataclasses' fields (type, default and the help in each field's
metadata), validates them per strategy, and passes the chosen strategy's config to it. They live
here, in a module that imports neither torch nor the `strategies` package, so that building the
command line (and `--help`) stays light.

Field metadata (all optional): `help`; `flag`, the option's name when it is not the field's name
with dashes (`shared_prefixes` is `--prefix-sharing`); `choices`; `min` and `max` for numbers;
`csv` for a list typed as comma-separated values.

What a strategy computes rather than is told (the model's mechanism tables, the model's sha256,
the strategy an Optuna study is seeded from) is passed to its constructor as arguments, not kept
here: see `strategies.make_strategy`.
"""

from dataclasses import asdict, dataclass, field, fields, is_dataclass

from advsearch.errors import AdvsearchError

SAMPLERS = ("tpe", "ga", "gp", "random")  # the Optuna samplers OptunaConfig.sampler names
SEED_FROM = ("guided",)  # the constructor strategies whose first batch can seed an Optuna study


def option(default, help: str, **meta):
    """A config field with its default and what `advsearch run --help` says about it."""
    return field(default=default, metadata={"help": help, **meta})


class ConfigError(AdvsearchError):
    """A strategy option with a value the strategy cannot use; `field` names the config field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class BatchConfig:
    """What every strategy takes: how many sequences go into one evaluator call."""

    batch_size: int = option(4096, "Sequences per batch.")


@dataclass
class SampledConfig(BatchConfig):
    """Strategies that spend a budget of sequences, drawn from a seed."""

    budget: int = option(10_000, "Sequences to evaluate.")
    seed: int = option(0, "Seed of every random choice the strategy makes.")


@dataclass
class ExhaustiveConfig(BatchConfig):
    batch_size: int = option(65_536, "Prefixes per chunk.")
    max_len: int = option(5, "Longest prefix, in tokens after '?'.", min=1)
    shared_prefixes: bool = option(True, "Compute each new prefix from its parent's cached keys/values.",
                                   flag="prefix-sharing")  # fmt: skip


@dataclass
class GuidedConfig(SampledConfig):
    families: list[str] | None = option(None, "Comma-separated constructor families (default: all; see "
                                              "strategies/guided.py).", csv=True)  # fmt: skip


@dataclass
class CoverConfig(SampledConfig):
    """Strategies that can keep the (true, predicted) confusion-coverage table."""

    cover_confusions: bool = option(False, "Aim at every (true, predicted) pair (random: only keep the table). "
                                           "Writes confusions.csv and prints the coverage matrix.")  # fmt: skip
    cover_threshold: float = option(0.9, "A pair is covered by a witness with p_pred at least this.", min=0.0, max=1.0)


@dataclass
class RandomConfig(CoverConfig):
    pass


@dataclass
class AdaptiveConfig(CoverConfig):
    """The searches that learn from verdicts: searched length and target."""

    length: int | None = option(None, "Searched sequence length, '?' included (default: the model's n_ctx).")
    target_pos: int | None = option(None, "Aim at this position (default: any).")
    target_true: str | None = option(None, "Aim at failures whose truth is this character.")
    target_pred: str | None = option(None, "Aim at failures predicting this character.")


@dataclass
class LocalConfig(AdaptiveConfig):
    two_position_moves: bool = option(True, "Try two-position moves at a local optimum before restarting.")


@dataclass
class OptunaConfig(AdaptiveConfig):
    batch_size: int = option(128, "Trials asked per batch.")
    sampler: str = option("tpe", "TPE (multivariate, constant liar), NSGA-II, GP (needs scipy) or random.",
                          choices=SAMPLERS)  # fmt: skip
    storage: str | None = option(None, "Storage URL (sqlite:///FILE, postgresql://..., journal:FILE); "
                                       "workers sharing it join one study.")  # fmt: skip
    study_name: str | None = option(None, "Study to create or join (default: from length/target).")
    seed_from: str | None = option(None, "Enqueue this strategy's first batch as the first trials.", choices=SEED_FROM)


# Strategy name -> its config, in the registry's order (a test keeps both equal to strategies.STRATEGIES).
STRATEGY_CONFIGS: dict[str, type] = {
    "random": RandomConfig,
    "exhaustive": ExhaustiveConfig,
    "guided": GuidedConfig,
    "local": LocalConfig,
    "optuna": OptunaConfig,
}


def config_fields(config_class: type) -> dict[str, object]:
    """Field name -> dataclasses.Field of a config class."""
    return {f.name: f for f in fields(config_class)}


def config_dict(config) -> dict:
    """A config as a JSON-serialisable dict (what summary.json records)."""
    return asdict(config) if is_dataclass(config) else dict(vars(config))

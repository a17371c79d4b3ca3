"""``python -m burnkit.resources <what> [flags]``: create an attack resource in the cache.

    python -m burnkit.resources clean_model --dataset cifar10 --model smallcnn
    python -m burnkit.resources lf_pattern  --dataset cifar10 --model smallcnn
    python -m burnkit.resources lc_adv      --dataset cifar10 --model smallcnn
    python -m burnkit.resources ssba        --dataset cifar10

``python -m burnkit.resources <what> --help`` lists a generator's flags.
"""
from __future__ import annotations

import sys

from ..config import find_config_file, parse_config
from ..errors import BurnError, cli_errors
from .clean_model import CleanModelConfig, generate_clean_model
from .lc_adv import LcAdvConfig, generate_lc_adv
from .lf_pattern import LfPatternConfig, generate_lf_pattern
from .ssba_codec import SsbaConfig, generate_ssba

GENERATORS = {
    "clean_model": (CleanModelConfig, generate_clean_model, "train a clean classifier (prototype YAML settings)"),
    "lf_pattern": (LfPatternConfig, generate_lf_pattern, "search a low-frequency universal perturbation"),
    "lc_adv": (LcAdvConfig, generate_lc_adv, "PGD adversarial training images for label-consistent"),
    "ssba": (SsbaConfig, generate_ssba, "train a StegaStamp-like encoder and embed a fixed bit string"),
}


def _default_yaml(what: str):
    def pick(cli: dict):
        if what != "clean_model":
            return None
        return find_config_file(f"config/attack/prototype/{cli.get('dataset') or 'cifar10'}.yaml")
    return pick


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m burnkit.resources"
    with cli_errors(prog):
        if not argv or argv[0] not in GENERATORS:
            choices = "\n".join(f"  {k:12s} {v[2]}" for k, v in GENERATORS.items())
            if argv and argv[0] in ("-h", "--help"):
                print(f"usage: {prog} <what> [flags]\n\n{choices}")
                return {}
            raise BurnError(f"say what to create: {prog} <{'|'.join(GENERATORS)}> [flags] "
                            f"(got {argv[0] if argv else 'nothing'!r})")
        what, rest = argv[0], argv[1:]
        config_cls, generate, description = GENERATORS[what]
        cfg, _, _ignored = parse_config(config_cls, rest, f"{prog} {what}", description, _default_yaml(what))
        summary = generate(cfg)
        print(f"{what}: wrote {', '.join(summary['outputs'])} in {summary['wall_time_s']:.1f}s")
        return summary


if __name__ == "__main__":
    main()

"""Every primary config and every option of every group composes; `_target_`s point at real objects."""

from pathlib import Path

import hydra
import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.testing import compose  # expands the short decoder spellings (decoder=X) as hawkspec-eval does

CONF = Path(__file__).resolve().parents[2] / "conf"
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (g.name, p.stem) for g in CONF.iterdir() if g.is_dir() and g.name not in {"local", "hydra"}
    for p in g.glob("*.yaml")
)


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes(name):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, return_hydra_config=True)
    for target in _targets(OmegaConf.to_container(cfg, resolve=False)):
        assert hydra.utils.get_object(target) is not None, target


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_group_option_composes_into_some_primary(group, option):
    """Each option composes with at least one primary config that uses its group."""
    errors = []
    for name in PRIMARY:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = None
            # experiment: `experiment=X` where the primary lists the group (eval.yaml), else `+experiment=X`
            forms = [f"{group}={option}", f"+{group}={option}"] if group == "experiment" else [f"{group}={option}"]
            for override in forms:
                try:
                    cfg = compose(name, overrides=[override])
                    break
                except Exception as e:  # group not used by this primary
                    errors.append(f"{name} ({override}): {e}")
            if cfg is None:
                continue
        for target in _targets(OmegaConf.to_container(cfg, resolve=False)):
            assert hydra.utils.get_object(target) is not None, target
        return
    pytest.fail(f"{group}={option} composes with no primary config:\n" + "\n".join(errors))

"""Load and check config.yaml: the JSON schema, then what a schema cannot say.

Every fault is reported on one line that names the config key (and the file) and the fault.
"""

import copy
from pathlib import Path

import jsonschema
import yaml

from .errors import InputError

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def defaults(section):
    """The schema's default of every key of a config section (one place for the CLI's defaults too)."""
    props = yaml.safe_load(SCHEMA.read_text())["properties"][section]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def _key(path):
    return ".".join(str(p) for p in path) or "<top level>"


def _fill_defaults(schema, value):
    """Fill `default`s of object properties (recursively), as snakemake's validate does."""
    if not isinstance(value, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in value and "default" in sub:
            value[name] = copy.deepcopy(sub["default"])
        elif name not in value and sub.get("type") == "object" and "additionalProperties" in sub:
            # an absent section (e.g. `stats:`) gets its own defaults; maps such as `samples` do not
            if any("default" in p for p in sub.get("properties", {}).values()):
                value[name] = {}
        if name in value:
            _fill_defaults(sub, value[name])


def validate(config, source="config.yaml", schema_path=SCHEMA, files=(), cli=None):
    """Validate against the schema (filling defaults), then check cross-references and paths.

    files: the YAML files the config was read from (Snakemake's configfiles); a refusal then
    names the file and line of the offending key instead of `source`, or ``--config`` when the
    key is among the command line's overrides `cli` (Snakemake's ``--config`` mapping).
    """
    try:
        return _validate(config, source, schema_path)
    except InputError as err:
        if not files or not err.where.startswith(f"{source}: "):
            raise
        key = err.where[len(source) + 2 :].removeprefix("config ")
        raise InputError(f"{locate(files, key, cli)}: {key}", err.fault) from None


def locate(files, key, cli=None):
    """``--config`` if the command line set the dotted `key` (or a parent), else ``file:line`` of
    the key (or of its deepest parent) in the last file that sets it, else the last file."""
    files, node = [str(f) for f in files], cli or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            break
        if not isinstance(node[part], dict):
            return "--config"
        node = node[part]
    for path in reversed(files):
        line = key_line(path, key.split("."))
        if line:
            return f"{path}:{line}"
    return files[-1]


def key_line(path, keys):
    """1-based line of the deepest of `keys` (a key path) found in YAML file `path`; None if none is."""
    try:
        node = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        elif isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        else:
            break
    return line


def _validate(config, source, schema_path):
    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise InputError(f"{source}: {_key(err.absolute_path)}", err.message)
    _fill_defaults(schema, config)
    _check_references(config, source)
    return config


def retype_cli_config(config, cli_config, schema_path=SCHEMA):
    """Type the nested `--config` values as YAML would, in `config` (which Snakemake already merged them into).

    Snakemake reads `--config training='{epochs: 2}'` with YAML's BaseLoader, so every nested scalar
    arrives as a string ('2'). Each such string is read again with `yaml.safe_load` unless the schema
    allows a string there; the merge into the config file's section is Snakemake's own (recursive).
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    for key, value in cli_config.items():
        if isinstance(value, dict | list) and key in config:
            config[key] = _retyped(config[key], value, _child(schema, key, schema), schema)
    return config


def _retyped(current, given, node, schema):
    """`current` with the strings that came from `given` (the --config mapping or list) parsed by YAML."""
    if isinstance(given, dict) and isinstance(current, dict):
        for k, v in given.items():
            if k in current:
                current[k] = _retyped(current[k], v, _child(node, k, schema), schema)
        return current
    if isinstance(given, list) and isinstance(current, list) and len(given) == len(current):
        item = _resolve(node, schema).get("items", {})
        return [_retyped(c, g, item, schema) for c, g in zip(current, given, strict=True)]
    if isinstance(current, str) and current == given and not _allows_string(node, schema):
        return yaml.safe_load(current)
    return current


def _resolve(node, schema):
    ref = node.get("$ref", "") if isinstance(node, dict) else ""
    if ref.startswith("#/"):
        for part in ref[2:].split("/"):
            schema = schema[part]
        return schema
    return node if isinstance(node, dict) else {}


def _alternatives(node, schema):
    node = _resolve(node, schema)
    return [node] + [_resolve(n, schema) for n in node.get("oneOf", []) + node.get("anyOf", [])]


def _child(node, key, schema):
    """The schema of `node`'s property `key` ({} when the schema does not say)."""
    for alt in _alternatives(node, schema):
        if key in alt.get("properties", {}):
            return alt["properties"][key]
        if isinstance(alt.get("additionalProperties"), dict):
            return alt["additionalProperties"]
    return {}


def _allows_string(node, schema):
    for alt in _alternatives(node, schema):
        types = alt.get("type", [])
        if "string" in ([types] if isinstance(types, str) else types):
            return True
    return False


def _check_references(config, source):
    for sid, sample in config["samples"].items():
        if "path" in sample and not Path(sample["path"]).is_dir():
            raise InputError(f"{source}: samples.{sid}.path", f"folder {sample['path']!r} does not exist")
    if config["encoder"] not in config["encoders"]:
        raise InputError(
            f"{source}: encoder", f"{config['encoder']!r} is not one of encoders {sorted(config['encoders'])}"
        )
    models = config["models"]
    for i, comp in enumerate(config.get("comparisons", [])):
        for side in ("a", "b"):
            if comp[side] not in models:
                raise InputError(
                    f"{source}: comparisons[{i}].{side}", f"model {comp[side]!r} is not declared under models"
                )
    _check_models(config, source)
    diffusion_settings(config, source)
    _check_factorial(config, source)
    _check_metrics(config, source)
    ms = config.get("figures", {}).get("multiscale_model")
    if ms and ms not in models:
        raise InputError(f"{source}: figures.multiscale_model", f"model {ms!r} is not declared under models")
    folds = config.get("folds", "loo")
    if folds != "loo":
        for sid in folds:
            if sid not in config["samples"]:
                raise InputError(f"{source}: folds", f"test sample {sid!r} is not declared under samples")
    if folds == "loo" and len(config["samples"]) < 2:
        raise InputError(f"{source}: folds", "leave-one-patient-out needs at least two samples")
    drawn = config.get("figures", {}).get("folds", "all")
    if drawn != "all":
        for name in drawn:
            if name not in fold_names(config):
                raise InputError(f"{source}: figures.folds", f"{name!r} is not a fold (folds are {fold_names(config)})")
    gs = config["genes"]["samples"]
    if isinstance(gs, list):  # "all" and "training" name no sample
        for sid in gs:
            if sid not in config["samples"]:
                raise InputError(f"{source}: genes.samples", f"sample {sid!r} is not declared under samples")
    validated = config.get("diffusion", {}).get("validate", True)
    for sid in validated if isinstance(validated, list) else []:
        if sid not in config["samples"]:
            raise InputError(f"{source}: diffusion.validate", f"sample {sid!r} is not declared under samples")
    if config["genes"]["method"] == "panel" and not config["genes"].get("panel"):
        raise InputError(f"{source}: genes.panel", "method 'panel' needs a panel file")
    for key in ("panel", "categories"):
        p = config["genes"].get(key)
        if p and not Path(p).is_file():
            raise InputError(f"{source}: genes.{key}", f"file {p!r} does not exist")


def _check_models(config, source):
    """Build each model's loss and check its decoder settings: a typo fails the plan, not a job."""
    from .decoders import DECODERS, check_decoder
    from .losses import build_loss

    for name in config.get("decoders", {}):
        if name not in DECODERS:
            raise InputError(f"{source}: decoders.{name}", f"unknown decoder; known: {sorted(DECODERS)}")
        check_decoder(name, config["decoders"][name], f"{source}: decoders.{name}")
    for name, model in config["models"].items():
        where = f"{source}: models.{name}"
        check_decoder(model["decoder"], {}, f"{where}.decoder")
        check_decoder(model["decoder"], model.get("decoder_kwargs", {}), f"{where}.decoder_kwargs")
        build_loss(model["loss"], n_genes=config["genes"]["n_genes"], where=f"{where}.loss")
        _check_train_um(config, name, source)


def _check_train_um(config, name, source):
    """train_um pools train_um / 2 bins of 2 um per side: that must divide the tile side (multiscale pools itself)."""
    model = config["models"][name]
    own = "train_um" in model.get("training", {})
    key = f"{source}: models.{name}.training.train_um" if own else f"{source}: training.train_um"
    um = model_config(config, name)["training"].get("train_um", 2)
    side = config.get("tiles", {}).get("tile_bins", 128)
    if side % (um // 2):
        raise InputError(key, f"{um} um bins ({um // 2} x {um // 2} bins of 2 um) do not tile tiles.tile_bins {side}")
    if um != 2 and model["loss"]["name"] == "multiscale":
        raise InputError(key, f"{um}, but a multiscale loss sets its own bin sizes (loss.scales): leave it at 2")


def diffusion_settings(config, source="config"):
    """The `diffusion:` section with every default filled, checked (it is what the stage runs with)."""
    from .diffusion.settings import check_settings

    section = {k: v for k, v in config.get("diffusion", {}).items() if k != "validate"}
    return check_settings(section, where=f"{source}: diffusion")


def _check_factorial(config, source):
    """Four cells, each a declared model with the decoder and loss it names, spanning two x two levels."""
    design = config.get("factorial")
    if not design:
        return
    cells, ref = design["cells"], design["reference"]
    for i, cell in enumerate(cells):
        where = f"{source}: factorial.cells[{i}]"
        model = config["models"].get(cell["model"])
        if model is None:
            raise InputError(f"{where}.model", f"model {cell['model']!r} is not declared under models")
        for key, declared in (("decoder", model["decoder"]), ("loss", model["loss"]["name"])):
            if cell[key] != declared:
                raise InputError(f"{where}.{key}", f"{cell[key]!r}, but model {cell['model']!r} has {key} {declared!r}")
    for key in ("decoder", "loss"):
        levels = {c[key] for c in cells}
        if len(levels) != 2 or ref[key] not in levels:
            raise InputError(f"{source}: factorial.reference.{key}", f"{ref[key]!r}: the cells need two {key}s, "
                             f"one of them the reference (cells have {sorted(levels)})")  # fmt: skip
    if len({(c["decoder"], c["loss"]) for c in cells}) != 4:
        raise InputError(f"{source}: factorial.cells", "the four cells must be the four (decoder, loss) pairs")


def _check_metrics(config, source):
    from .metrics import METRICS

    for i, metric in enumerate(config.get("stats", {}).get("metrics", [])):
        if metric not in METRICS:
            raise InputError(f"{source}: stats.metrics[{i}]", f"unknown metric {metric!r}; known: {list(METRICS)}")


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise InputError(
                    f"{self.name}:{key_node.start_mark.line + 1}",
                    f"key {key!r} is given twice in one mapping (first on line {seen[key]}): YAML would keep "
                    "only the last",
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path):
    """A config file's YAML, refusing duplicate keys and naming the file and line of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file does not exist")
    text = path.read_text()
    try:
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise InputError(f"{path}:{mark.line + 1}", f"not valid YAML ({err.problem})") from None
    except yaml.YAMLError as err:
        raise InputError(path, f"not valid YAML ({str(err).splitlines()[0]})") from None


def load(path):
    """Read a YAML config file and validate it."""
    path = Path(path)
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise InputError(path, "must be a mapping of keys to values")
    return validate(config, source=str(path))


def fold_names(config):
    """Folds are named by their test sample: test-P1, test-P2, ..."""
    samples = list(config["samples"])
    tests = samples if config.get("folds", "loo") == "loo" else list(config["folds"])
    return [f"test-{s}" for s in tests]


def fold_samples(config, fold):
    """(train samples, test sample) of a fold name."""
    test = fold.removeprefix("test-")
    if test not in config["samples"]:
        raise InputError("fold", f"{fold!r} names no declared sample")
    return [s for s in config["samples"] if s != test], test


#: Training keys that change how batches are served, never a number: they neither rerun a job
#: (the workflow's params leave them out) nor stop a checkpoint from resuming.
SERVING_KEYS = ("resident", "num_workers")


def model_config(config, name, serving=True):
    """One model's resolved settings: training defaults overridden by the model's own keys.

    ``serving=False`` leaves out :data:`SERVING_KEYS` (what decides the weights, nothing else).
    """
    if name not in config["models"]:
        raise InputError("config models", f"model {name!r} is not declared")
    model = copy.deepcopy(config["models"][name])
    training = copy.deepcopy(config.get("training", {}))
    for k, v in model.pop("training", {}).items():
        training[k] = {**training.get(k, {}), **v} if isinstance(v, dict) else v
    if not serving:
        training = {k: v for k, v in training.items() if k not in SERVING_KEYS}
    widths = {**config.get("decoders", {}).get(model["decoder"], {}), **model.pop("decoder_kwargs", {})}
    return {
        "name": name,
        "decoder": model["decoder"],
        "decoder_kwargs": widths,
        "loss": model["loss"],
        "counts": model.get("counts", "raw"),
        "training": training,
    }


def encoder_config(config, name=None):
    name = name or config["encoder"]
    return {"name": name, **config["encoders"][name]}


#: Top-level maps whose key order means something (folds, figure and table order).
ORDERED_MAPS = ("samples", "models", "encoders")


def canonical(config):
    """The config with every mapping's keys sorted, except the order of samples, models and encoders.

    Snakemake compares a rule's params by their representation: sorting makes a reordered
    config.yaml (same values) trigger no rerun.
    """

    def sort(value):
        if isinstance(value, dict):
            return {k: sort(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [sort(v) for v in value]
        return value

    out = {}
    for key in sorted(config):
        value = config[key]
        out[key] = {k: sort(v) for k, v in value.items()} if key in ORDERED_MAPS else sort(value)
    return out

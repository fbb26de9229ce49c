"""Type stub of hookmix's lazily loaded public names, written by docs/gen_api.py from _WHERE."""

from hookmix.mixing.mixer import HookMixer as HookMixer
from hookmix.mixing.settings import MixSettings as MixSettings
from hookmix.mixing.targets import MixStep as MixStep
from hookmix.graph.layers import list_layers as list_layers
from hookmix.graph.equivalence import mix_equivalence as mix_equivalence
from hookmix.graph.splitting import split as split
from hookmix.headonly.cache import CacheKey as CacheKey
from hookmix.headonly.cache import FeatureCache as FeatureCache
from hookmix.headonly.heads import build_head as build_head
from hookmix.headonly.training import fit as fit
from hookmix.headonly.training import FitConfig as FitConfig
from hookmix.headonly.training import FitResult as FitResult
from hookmix.headonly.trained_model import FinetunedConfig as FinetunedConfig
from hookmix.headonly.trained_model import FinetunedModel as FinetunedModel
from hookmix.headonly.trained_model import load_finetuned as load_finetuned
from hookmix.headonly.trained_model import save_finetuned as save_finetuned
from hookmix.headonly.sweep import sweep as sweep
from hookmix.evaluation.metrics import evaluate as evaluate
from hookmix.evaluation.metrics import evaluate_multilabel as evaluate_multilabel
from hookmix.evaluation.calibration import fit_temperature as fit_temperature
from hookmix.evaluation.metrics import mean_ci as mean_ci
from hookmix.evaluation.metrics import reliability as reliability
from hookmix.evaluation.metrics import tune_thresholds as tune_thresholds
from hookmix.core.errors import HookmixWarning as HookmixWarning
from hookmix.core.errors import UsageError as UsageError

__version__: str
__all__ = [
    'HookMixer',
    'MixSettings',
    'MixStep',
    'list_layers',
    'mix_equivalence',
    'split',
    'CacheKey',
    'FeatureCache',
    'build_head',
    'fit',
    'FitConfig',
    'FitResult',
    'FinetunedConfig',
    'FinetunedModel',
    'load_finetuned',
    'save_finetuned',
    'sweep',
    'evaluate',
    'evaluate_multilabel',
    'fit_temperature',
    'mean_ci',
    'reliability',
    'tune_thresholds',
    'HookmixWarning',
    'UsageError',
    '__version__',
]

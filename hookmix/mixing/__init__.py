"""Mixing: the settings, the per-step plan (λ, partners, CutMix box), blending activations and targets by
one plan, the train-mode gate, the checkpoint replay, and the ``HookMixer`` that hooks them into a model."""

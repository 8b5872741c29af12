"""The bundled sample model, installed as ``stjfd_convert.sample_models``.

``sample_model.safetensors`` + ``sample_model.json`` are the weights and their description (architecture,
data recipe, training settings, held-out accuracy, versions); ``MODEL_CARD.md`` is the same for people.
``train_sample_model.py`` wrote all three and reproduces them:
``python sample_models/train_sample_model.py``. :mod:`stjfd_convert.sample` reads them.
"""

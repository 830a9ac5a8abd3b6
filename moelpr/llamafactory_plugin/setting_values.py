"""The values of the moelpr settings that several plugin modules read: ``finetuning_type``, ``moelpr_stage`` and
dataset_info.json's ``language`` (kept apart from hparams.py, which imports the modules that read them)."""

MOELPR = "moelpr"
POST_PRETRAIN = "post_pretrain"
REVIEW = "review"
OLD, NEW = "old", "new"
LANGUAGES = (OLD, NEW)

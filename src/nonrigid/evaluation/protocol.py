"""The evaluation protocol's names, torch-free (the command line shows them before any network loads): the three
metrics every edit is scored with, and the default CLIP backbone of CLIP-T and the aesthetic score."""

METRIC_NAMES = ("clip_t", "lpips", "aesthetic")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

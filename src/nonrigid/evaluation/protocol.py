"""The evaluation protocol's names, torch-free (the command line shows them before any network loads): the three
metrics every edit is scored with, and the default CLIP backbone of CLIP-T and the aesthetic score."""

METRIC_NAMES = ("clip_t", "lpips", "aesthetic")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

# PIE-Bench's metrics (its evaluate.py's default set, Table 1 of PnP Inversion), scored on PIE-Bench pairs only
PIE_METRIC_NAMES = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part",
                    "ssim_unedit_part", "clip_similarity_target_image", "clip_similarity_target_image_edit_part")
PIE_UNEDITED = PIE_METRIC_NAMES[1:5]  # NaN when the mask covers the whole image
DEFAULT_DINO = "facebook/dino-vitb8"

# The working size a benchmark's protocol fixes, where it fixes one (else edits take the model's native size):
# PIE-Bench's images and masks are 512 px, and its evaluation compares edits at that size.
PROTOCOL_SIZES = {"piebench": 512}

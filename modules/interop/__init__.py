"""Other people's weights: diffusers / Stable Diffusion / LDM VAEs (SD 1.x/2.x, SDXL, SD3, FLUX), diffusers DiTs
and the DiT papers' state dicts (``init_from``), ours out to diffusers (exports), CLIP text encoders, LPIPS-VGG16.

Rule: converts what others publish into our networks (and back); reads weights from safetensors, or a plain
pickled state dict through ``torch.load(weights_only=True)`` (the papers' ``.pt`` files), and never runs code
from a file.
"""

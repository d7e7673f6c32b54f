"""Other people's weights: diffusers / Stable Diffusion / LDM VAEs, diffusers DiTs (``init_from``), CLIP
text encoders, LPIPS-VGG16.

Rule: converts what others publish into our networks (and back); reads weights from safetensors
or refuses, and never unpickles code.
"""

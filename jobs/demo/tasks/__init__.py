"""The demo's image tasks after the shared stages: super-resolution, inpainting, semantic synthesis,
image guiding and class-conditional sampling, each a module of stages, check, headline and report."""

import merging  # noqa: F401  (first: it sets torch allocator options that must precede `import torch`)

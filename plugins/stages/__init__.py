"""Built-in stages. Each module exposes ``STAGE`` and is registered in the root pyproject.toml under
``[project.entry-points."internlm2.stages"]`` — the same way a third-party package registers one."""

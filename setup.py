"""Static packaging metadata for packnet: no hardware probing, no build steps."""

from setuptools import find_packages, setup

setup(
    name="packnet",
    version="0.1.0",
    description="Serve many tasks from one PackNet-pruned network with Triton kernels that fuse the task mask",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["packnet", "packnet.*", "packnet_kernels", "packnet_kernels.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers pinned: an unpinned one may ask for a torch the CPU install does not have. Ray Serve pinned as
        # in the serve extra, so that tests/test_serve.py runs in CI.
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
            "transformers==5.24.0",
            # torchvision's transforms import PIL; torchvision itself is installed by the Makefile, matched to torch.
            "pillow>=9",
            "ray[serve]==2.60.0",
        ],
        "transformers": ["transformers>=4.40"],
        # Ray Serve for `packnet serve` and packnet.serve; pinned: its HTTP, batching and metrics behaviour is tested.
        "serve": ["ray[serve]==2.60.0"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
        "demo": ["scikit-learn>=1.3"],
        "dev": ["ruff>=0.6"],
        # `make docs`: the pages in docs/ and the API reference from the docstrings, warnings as errors.
        "docs": ["mkdocs==1.6.1", "mkdocstrings[python]==1.0.8", "mkdocstrings-python==2.0.11"],
    },
    entry_points={"console_scripts": ["packnet=packnet.cli:console_main"]},
)

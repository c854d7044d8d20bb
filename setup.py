"""Packaging for qnwb, read from `settings.ini` the nbdev 2 way (no metadata is repeated here)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools
from setuptools.command.build_py import build_py

here = Path(__file__).parent
cfg = ConfigParser(delimiters=["="])
cfg.read(here / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
min_python = cfg["min_python"]
lic = licenses[cfg["license"]]



class BuildWithTemplates(build_py):
    """The report templates (nbs/reports/*.ipynb) travel in the wheel as qnwb/report_templates, where an installed
    qnwb finds them (qnwb.reports.reports_dir); in a checkout they stay only in nbs/reports."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / cfg["lib_path"] / "report_templates"
        target.mkdir(parents=True, exist_ok=True)
        for template in sorted((here / "nbs" / "reports").glob("*.ipynb")):
            self.copy_file(str(template), str(target / template.name))


setuptools.setup(
    cmdclass={"build_py": BuildWithTemplates},
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=lic[0],
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    classifiers=[
        f"Development Status :: {statuses[int(cfg['status'])]}",
        f"Intended Audience :: {cfg['audience']}",
        f"License :: {lic[1]}",
        f"Natural Language :: {cfg['language']}",
        f"Programming Language :: Python :: {min_python}",
    ],
    python_requires=f">={min_python}",
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    install_requires=cfg["requirements"].split(),
    extras_require={"dev": cfg["dev_requirements"].split()},
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)

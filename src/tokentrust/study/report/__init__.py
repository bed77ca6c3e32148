"""The grid report: `build.build_report` writes GRID_DIR/report.md, summary.csv and plots/*.png."""

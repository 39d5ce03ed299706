"""Results tables (Parquet/CSV/Markdown), plots and the HTML report of a sweep."""

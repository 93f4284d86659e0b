"""Result files and the comparison report: the CSV/JSON schema, reading runs back, the report and its figures."""

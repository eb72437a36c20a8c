# Sourced by the project's scripts for `-h`/`--help`: print_usage SCRIPT
# prints SCRIPT's leading comment block (after the #! line, up to the first
# line that is not a comment) without the comment marks, on stdout.
print_usage() {
    sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$1"
}

# Option parsing shared by the recipes; source it after setting the defaults.
#   --some-name VALUE   sets $some_name, which must already have a default
#   key=value           is collected in the array $overrides (passed to `speechtl train`)
#   -h, --help          prints the script's header comment
overrides=()
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0;;
        --*=*) echo "use '--name value', not '$1'" >&2; exit 1;;
        --*)
            _name=${1#--}; _name=${_name//-/_}
            if [ -z "${!_name+x}" ]; then echo "unknown option $1" >&2; exit 1; fi
            if [ $# -lt 2 ]; then echo "option $1 needs a value" >&2; exit 1; fi
            printf -v "$_name" '%s' "$2"; shift 2;;
        *=*) overrides+=("$1"); shift;;
        *) echo "unknown argument $1" >&2; exit 1;;
    esac
done

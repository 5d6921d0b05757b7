"""Rules for the exported symbol (`--symbol`): it names C functions a dynamic linker
resolves in Lamarr's process and the files export writes, so it must be a plain,
short C identifier that cannot shadow the C language, the C library, or effgen's
own internal names. Each refusal names the rule."""

import re

from effgen.errors import ConfigError

MAX_LENGTH = 64
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,%d}" % (MAX_LENGTH - 1))

# C99, C11 and C23 keywords (a symbol is also spelled in the generated C).
C_KEYWORDS = frozenset("""
auto break case char const continue default do double else enum extern float for goto if
inline int long register restrict return short signed sizeof static struct switch typedef
union unsigned void volatile while _Bool _Complex _Imaginary _Alignas _Alignof _Atomic
_Generic _Noreturn _Static_assert _Thread_local alignas alignof bool constexpr false
nullptr static_assert thread_local true typeof typeof_unqual _BitInt _Decimal32
_Decimal64 _Decimal128
""".split())

# <math.h> functions; each also exists with an f (float) and l (long double) suffix.
_MATH = """
acos acosh asin asinh atan atan2 atanh cbrt ceil copysign cos cosh erf erfc exp exp2
expm1 fabs fdim floor fma fmax fmin fmod frexp hypot ilogb ldexp lgamma llrint llround
log log10 log1p log2 logb lrint lround modf nan nearbyint nextafter nexttoward pow
remainder remquo rint round scalbln scalbn sin sinh sqrt tan tanh tgamma trunc
j0 j1 jn y0 y1 yn gamma significand exp10 pow10 sincos drem finite isinf isnan
""".split()

# The C library and POSIX functions and objects a process is likely to hold, plus the
# names a linker or loader treats specially (underscored ones are refused by rule).
_LIBC = """
main system exit abort atexit at_quick_exit quick_exit getenv setenv unsetenv putenv
malloc calloc realloc free aligned_alloc posix_memalign memalign valloc
printf fprintf sprintf snprintf vprintf vfprintf vsprintf vsnprintf scanf fscanf sscanf
puts fputs gets fgets putchar getchar fputc fgetc putc getc ungetc perror
fopen fclose fread fwrite fflush fseek ftell rewind remove rename tmpfile tmpnam
memcpy memmove memset memcmp memchr strcpy strncpy strcat strncat strcmp strncmp strlen
strchr strrchr strstr strtok strdup strndup strerror strtol strtoul strtoll strtoull
strtod strtof strtold atoi atol atoll atof qsort bsearch abs labs llabs div ldiv rand
srand random srandom time clock difftime mktime localtime gmtime strftime signal raise
setjmp longjmp errno environ stdin stdout stderr
open close read write lseek unlink link symlink mkdir rmdir chdir getcwd dup dup2 pipe
fork vfork execl execlp execle execv execvp execve popen pclose wait waitpid kill
sleep usleep nanosleep getpid getppid getuid setuid chmod chown stat fstat lstat access
mmap munmap mprotect dlopen dlsym dlclose dlerror pthread_create pthread_join
socket connect bind listen accept send recv select poll ioctl fcntl syscall
""".split()

LIBC_NAMES = frozenset(_LIBC + _MATH + [m + "f" for m in _MATH] + [m + "l" for m in _MATH])

OWN_PREFIXES = ("effgen_", "EFFGEN_")


def check_symbol(symbol) -> str:
    """Return `symbol` if it may name the exported functions, else raise ConfigError
    saying which rule it breaks."""
    shown = repr(symbol) if len(str(symbol)) <= 80 else repr(str(symbol)[:80]) + "..."
    if not isinstance(symbol, str) or not symbol:
        raise ConfigError("symbol: empty; give a C identifier such as 'efficiency'")
    if len(symbol) > MAX_LENGTH:
        raise ConfigError(f"symbol {shown}: {len(symbol)} characters, at most {MAX_LENGTH}")
    if not _IDENTIFIER.fullmatch(symbol):
        raise ConfigError(f"symbol {shown}: not a C identifier (letters, digits and _, "
                          f"not starting with a digit: [A-Za-z_][A-Za-z0-9_]*)")
    if symbol.startswith("_"):
        raise ConfigError(f"symbol {shown}: starts with '_', which C reserves for the "
                          f"implementation (e.g. _start, __libc_*)")
    if symbol in C_KEYWORDS:
        raise ConfigError(f"symbol {shown}: a C keyword")
    if symbol in LIBC_NAMES:
        raise ConfigError(f"symbol {shown}: a C library / libm name; the library would "
                          f"export it to Lamarr's whole process")
    if symbol.startswith(OWN_PREFIXES):
        raise ConfigError(f"symbol {shown}: starts with {'/'.join(OWN_PREFIXES)}, "
                          f"effgen's prefix for its own internal names")
    return symbol

/*
 * Native fast paths for IMA measurement lists: parsing canonical ima-ng lines of the ASCII
 * form, replaying entries into PCR 10 with the template-hash check, and the first pass of a
 * runtime-policy check.
 *
 * Each function mirrors Python code that stays the reference (evidence/ima/ascii.py,
 * verification.py and replay.py, policies/runtime/evaluate.py), and the tests compare both on
 * random and mutated input. The parser accepts only lines that the Python fast path accepts
 * and builds the same ImaEntry tuple. At any other line it stops and returns that line's
 * offset, so that the Python parser reports or accepts the line. Every read is bounded by the
 * end of the current line. The replay and the policy pass hand back to the Python code, or return the
 * entries for it to check, wherever an entry is not an ImaEntry of the expected field types.
 *
 * Hashes come from OpenSSL's libcrypto, the library that hashlib and cryptography use. The
 * replay calls its one-shot SHA functions rather than EVP: OpenSSL 3 deprecates them, but
 * EVP's provider dispatch costs about 20 ns a call, a quarter of hashing a short template,
 * and a replay makes three such calls per entry.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define ENTRY_FIELDS 10
#define IMA_PCR 10
#define MAX_DIGEST 64

/* Values of lowercase hexadecimal digits. Every other byte, uppercase included, maps to -1. */
static signed char hex_value[256];

static void init_hex_table(void)
{
    memset(hex_value, -1, sizeof(hex_value));
    for (int digit = 0; digit < 10; digit++)
        hex_value['0' + digit] = (signed char)digit;
    for (int digit = 0; digit < 6; digit++)
        hex_value['a' + digit] = (signed char)(10 + digit);
}

/* Decode 2 * size lowercase hex digits into size bytes, or return 0 for any other character.
 * A bad digit makes `invalid` negative, which is checked once after the loop. */
static int decode_hex(const unsigned char *text, Py_ssize_t size, unsigned char *out)
{
    int invalid = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        int high = hex_value[text[2 * i]];
        int low = hex_value[text[2 * i + 1]];
        invalid |= high | low;
        out[i] = (unsigned char)(((unsigned)high << 4) | ((unsigned)low & 0x0f));
    }
    return invalid >= 0;
}

/* The PCR column as the Python fast path accepts it: "0" to "23" without leading zeros. */
static int parse_pcr(const unsigned char *text, Py_ssize_t length)
{
    if (length == 1 && text[0] >= '0' && text[0] <= '9')
        return text[0] - '0';
    if (length == 2 && text[0] >= '1' && text[0] <= '2' && text[1] >= '0' && text[1] <= '9') {
        int pcr = (text[0] - '0') * 10 + (text[1] - '0');
        return pcr <= 23 ? pcr : -1;
    }
    return -1;
}

/* One row of the d-ng table the caller passes: algorithm name, the template data prefix
 * (u32 length of the d-ng field and "<algorithm>:\0"), and the shared name string. */
typedef struct {
    const char *algorithm;
    Py_ssize_t algorithm_length;
    const char *prefix;
    Py_ssize_t prefix_length;
    Py_ssize_t digest_size;
    PyObject *name;
} DigestKind;

#define MAX_DIGEST_KINDS 64

static int load_digest_kinds(PyObject *table, DigestKind *kinds, Py_ssize_t *count)
{
    if (!PyTuple_Check(table) || PyTuple_GET_SIZE(table) > MAX_DIGEST_KINDS) {
        PyErr_SetString(PyExc_TypeError, "d-ng table must be a tuple of at most 64 rows");
        return 0;
    }
    *count = PyTuple_GET_SIZE(table);
    for (Py_ssize_t i = 0; i < *count; i++) {
        PyObject *row = PyTuple_GET_ITEM(table, i);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 4
            || !PyBytes_Check(PyTuple_GET_ITEM(row, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(row, 1))
            || !PyLong_Check(PyTuple_GET_ITEM(row, 2)) || !PyUnicode_Check(PyTuple_GET_ITEM(row, 3))) {
            PyErr_SetString(PyExc_TypeError,
                            "d-ng table rows must be (algorithm bytes, prefix bytes, size int, name str)");
            return 0;
        }
        kinds[i].algorithm = PyBytes_AS_STRING(PyTuple_GET_ITEM(row, 0));
        kinds[i].algorithm_length = PyBytes_GET_SIZE(PyTuple_GET_ITEM(row, 0));
        kinds[i].prefix = PyBytes_AS_STRING(PyTuple_GET_ITEM(row, 1));
        kinds[i].prefix_length = PyBytes_GET_SIZE(PyTuple_GET_ITEM(row, 1));
        kinds[i].digest_size = PyLong_AsSsize_t(PyTuple_GET_ITEM(row, 2));
        if (kinds[i].digest_size < 0 || kinds[i].digest_size > MAX_DIGEST) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "d-ng table digest size %zd is invalid; expected 0 to 64",
                             kinds[i].digest_size);
            return 0;
        }
        kinds[i].name = PyTuple_GET_ITEM(row, 3);
    }
    return 1;
}

static const DigestKind *find_digest_kind(const DigestKind *kinds, Py_ssize_t count,
                                          const unsigned char *algorithm, Py_ssize_t length)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        if (kinds[i].algorithm_length == length && memcmp(kinds[i].algorithm, algorithm, length) == 0)
            return &kinds[i];
    }
    return NULL;
}

/* Build one ImaEntry from a canonical ima-ng line, or return NULL without an exception set
 * when the line is not canonical. */
static PyObject *parse_line(PyTypeObject *entry_type, PyObject *template_name,
                            const DigestKind *kinds, Py_ssize_t kind_count,
                            Py_ssize_t template_hash_size, Py_ssize_t index,
                            const unsigned char *line, const unsigned char *line_end)
{
    static const char TEMPLATE_FIELD[] = "ima-ng ";
    const Py_ssize_t template_field_length = sizeof(TEMPLATE_FIELD) - 1;

    /* <pcr> */
    const unsigned char *space = memchr(line, ' ', line_end - line);
    if (space == NULL)
        return NULL;
    int pcr = parse_pcr(line, space - line);
    if (pcr < 0)
        return NULL;

    /* <template-hash> */
    const unsigned char *cursor = space + 1;
    Py_ssize_t hex_length = 2 * template_hash_size;
    unsigned char template_hash[MAX_DIGEST];
    if (line_end - cursor <= hex_length || cursor[hex_length] != ' '
        || !decode_hex(cursor, template_hash_size, template_hash))
        return NULL;
    cursor += hex_length + 1;

    /* ima-ng */
    if (line_end - cursor < template_field_length
        || memcmp(cursor, TEMPLATE_FIELD, template_field_length) != 0)
        return NULL;
    cursor += template_field_length;

    /* <algorithm>:<digest> */
    const unsigned char *digest_end = memchr(cursor, ' ', line_end - cursor);
    if (digest_end == NULL)
        return NULL;
    const unsigned char *colon = memchr(cursor, ':', digest_end - cursor);
    if (colon == NULL)
        return NULL;
    const DigestKind *kind = find_digest_kind(kinds, kind_count, cursor, colon - cursor);
    if (kind == NULL || digest_end - (colon + 1) != 2 * kind->digest_size)
        return NULL;
    const unsigned char *digest_hex = colon + 1;

    /* <name>: the rest of the line, UTF-8 without NUL bytes. */
    const unsigned char *name = digest_end + 1;
    Py_ssize_t name_length = line_end - name;
    if (memchr(name, '\0', name_length) != NULL)
        return NULL;
    if (name_length + 1 > (Py_ssize_t)UINT32_MAX)
        return NULL;

    Py_ssize_t digest_offset = kind->prefix_length;
    Py_ssize_t name_offset = digest_offset + kind->digest_size + 4;
    PyObject *template_data = PyBytes_FromStringAndSize(NULL, name_offset + name_length + 1);
    if (template_data == NULL)
        return NULL;
    unsigned char *data = (unsigned char *)PyBytes_AS_STRING(template_data);
    memcpy(data, kind->prefix, kind->prefix_length);
    if (!decode_hex(digest_hex, kind->digest_size, data + digest_offset)) {
        Py_DECREF(template_data);
        return NULL;
    }
    uint32_t name_field_length = (uint32_t)(name_length + 1);
    unsigned char *length_field = data + digest_offset + kind->digest_size;
    length_field[0] = (unsigned char)(name_field_length & 0xff);
    length_field[1] = (unsigned char)((name_field_length >> 8) & 0xff);
    length_field[2] = (unsigned char)((name_field_length >> 16) & 0xff);
    length_field[3] = (unsigned char)((name_field_length >> 24) & 0xff);
    memcpy(data + name_offset, name, name_length);
    data[name_offset + name_length] = '\0';

    PyObject *path = PyUnicode_DecodeUTF8((const char *)name, name_length, NULL);
    if (path == NULL) {
        Py_DECREF(template_data);
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
        }
        return NULL;
    }

    PyObject *entry = NULL;
    PyObject *index_object = PyLong_FromSsize_t(index);
    PyObject *pcr_object = PyLong_FromLong(pcr);
    PyObject *hash_object = PyBytes_FromStringAndSize((const char *)template_hash, template_hash_size);
    PyObject *digest = PyBytes_FromStringAndSize((const char *)data + digest_offset, kind->digest_size);
    if (index_object == NULL || pcr_object == NULL || hash_object == NULL || digest == NULL)
        goto failed;
    entry = entry_type->tp_alloc(entry_type, ENTRY_FIELDS);
    if (entry == NULL)
        goto failed;
    Py_INCREF(template_name);
    Py_INCREF(kind->name);
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    PyTuple_SET_ITEM(entry, 0, index_object);
    PyTuple_SET_ITEM(entry, 1, pcr_object);
    PyTuple_SET_ITEM(entry, 2, hash_object);
    PyTuple_SET_ITEM(entry, 3, template_name);
    PyTuple_SET_ITEM(entry, 4, kind->name);
    PyTuple_SET_ITEM(entry, 5, digest);
    PyTuple_SET_ITEM(entry, 6, path);
    PyTuple_SET_ITEM(entry, 7, Py_None);
    PyTuple_SET_ITEM(entry, 8, Py_None);
    PyTuple_SET_ITEM(entry, 9, template_data);
    /* Bytes, strings, integers and None cannot form reference cycles, so the cyclic collector
     * need not visit the entry. Its own collections untrack such plain tuples too, but later. */
    PyObject_GC_UnTrack(entry);
    return entry;

failed:
    Py_XDECREF(index_object);
    Py_XDECREF(pcr_object);
    Py_XDECREF(hash_object);
    Py_XDECREF(digest);
    Py_DECREF(path);
    Py_DECREF(template_data);
    return NULL;
}

PyDoc_STRVAR(parse_ima_ng_doc,
"parse_ima_ng(data, position, first_index, template_hash_size, entry_type, template,\n"
"             d_ng_table, entries) -> int\n\n"
"Parse canonical ima-ng lines of data (bytes or ASCII str) from offset position on,\n"
"appending an entry_type tuple for each to the list entries; the first one gets index\n"
"first_index.\n"
"Return the offset of the first line that is not canonical, or len(data).");

static PyObject *parse_ima_ng(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *data_object, *entry_type_object, *template_name, *table, *entries;
    Py_ssize_t position, first_index, template_hash_size;
    if (!PyArg_ParseTuple(args, "OnnnO!UO!O!", &data_object, &position, &first_index,
                          &template_hash_size, &PyType_Type, &entry_type_object, &template_name,
                          &PyTuple_Type, &table, &PyList_Type, &entries))
        return NULL;

    PyTypeObject *entry_type = (PyTypeObject *)entry_type_object;
    if (!PyType_IsSubtype(entry_type, &PyTuple_Type) || entry_type->tp_dictoffset != 0) {
        PyErr_SetString(PyExc_TypeError, "entry_type must be a tuple subclass without __dict__");
        return NULL;
    }
    if (template_hash_size <= 0 || template_hash_size > MAX_DIGEST) {
        PyErr_SetString(PyExc_ValueError, "template_hash_size must be from 1 to 64");
        return NULL;
    }
    DigestKind kinds[MAX_DIGEST_KINDS];
    Py_ssize_t kind_count;
    if (!load_digest_kinds(table, kinds, &kind_count))
        return NULL;

    /* Bytes, or ASCII text read in place: its characters are its UTF-8 bytes. */
    const unsigned char *base;
    Py_ssize_t size;
    if (PyBytes_Check(data_object)) {
        base = (const unsigned char *)PyBytes_AS_STRING(data_object);
        size = PyBytes_GET_SIZE(data_object);
    } else if (PyUnicode_Check(data_object) && PyUnicode_IS_COMPACT_ASCII(data_object)) {
        base = (const unsigned char *)PyUnicode_DATA(data_object);
        size = PyUnicode_GET_LENGTH(data_object);
    } else {
        PyErr_SetString(PyExc_TypeError, "data must be bytes or ASCII str");
        return NULL;
    }
    if (position < 0 || position > size) {
        PyErr_SetString(PyExc_ValueError, "position is outside data");
        return NULL;
    }

    Py_ssize_t index = first_index;
    /* Stops before an index that would overflow: the caller's Python code goes on. */
    while (position < size && index < PY_SSIZE_T_MAX) {
        const unsigned char *line = base + position;
        const unsigned char *newline = memchr(line, '\n', size - position);
        const unsigned char *line_end = newline != NULL ? newline : base + size;
        PyObject *entry = parse_line(entry_type, template_name, kinds, kind_count,
                                     template_hash_size, index, line, line_end);
        if (entry == NULL) {
            if (PyErr_Occurred())
                return NULL;
            break;
        }
        int appended = PyList_Append(entries, entry);
        Py_DECREF(entry);
        if (appended < 0)
            return NULL;
        index++;
        position = (line_end - base) + 1;
    }
    if (position > size)
        position = size;
    return PyLong_FromSsize_t(position);
}

PyDoc_STRVAR(entries_tuple_doc,
"entries_tuple(entries) -> tuple\n\n"
"Return the list entries as a tuple that the cyclic garbage collector does not track. Only\n"
"for entries that hold bytes, strings, integers and None, as the parsers build them: such\n"
"a tuple cannot be part of a reference cycle, and the collector would otherwise visit every\n"
"entry once before it untracks the tuple itself.");

static PyObject *entries_tuple(PyObject *Py_UNUSED(module), PyObject *list)
{
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "entries must be a list");
        return NULL;
    }
    PyObject *tuple = PyList_AsTuple(list);
    if (tuple != NULL && PyObject_GC_IsTracked(tuple))
        PyObject_GC_UnTrack(tuple);
    return tuple;
}

/* ---- Replay ------------------------------------------------------------------------------ */

/* Hash first || second (second may be empty) into out. */
typedef void (*HashFunction)(const void *first, size_t first_length, const void *second,
                             size_t second_length, unsigned char *out);

#define DEFINE_HASH(function, context_type, init, update, final)                               \
    static void function(const void *first, size_t first_length, const void *second,          \
                         size_t second_length, unsigned char *out)                             \
    {                                                                                          \
        context_type context;                                                                  \
        init(&context);                                                                        \
        update(&context, first, first_length);                                                 \
        if (second_length > 0)                                                                 \
            update(&context, second, second_length);                                           \
        final(out, &context);                                                                  \
    }

DEFINE_HASH(hash_sha1, SHA_CTX, SHA1_Init, SHA1_Update, SHA1_Final)
DEFINE_HASH(hash_sha256, SHA256_CTX, SHA256_Init, SHA256_Update, SHA256_Final)
DEFINE_HASH(hash_sha384, SHA512_CTX, SHA384_Init, SHA384_Update, SHA384_Final)
DEFINE_HASH(hash_sha512, SHA512_CTX, SHA512_Init, SHA512_Update, SHA512_Final)

typedef struct {
    HashFunction hash;
    const char *name;
    int size;
} Bank;

static const Bank banks[] = {
    {hash_sha1, "sha1", 20},
    {hash_sha256, "sha256", 32},
    {hash_sha384, "sha384", 48},
    {hash_sha512, "sha512", 64},
};
#define BANK_COUNT ((Py_ssize_t)(sizeof(banks) / sizeof(banks[0])))

static const Bank *find_bank(PyObject *name)
{
    for (Py_ssize_t i = 0; i < BANK_COUNT; i++) {
        if (PyUnicode_CompareWithASCIIString(name, banks[i].name) == 0)
            return &banks[i];
    }
    return NULL;
}

static int append_int(PyObject *list, Py_ssize_t value)
{
    PyObject *number = PyLong_FromSsize_t(value);
    if (number == NULL)
        return 0;
    int appended = PyList_Append(list, number);
    Py_DECREF(number);
    return appended == 0;
}

static int all_zero(const unsigned char *bytes, Py_ssize_t length)
{
    for (Py_ssize_t i = 0; i < length; i++) {
        if (bytes[i] != 0)
            return 0;
    }
    return 1;
}

/* How far ahead the loops over entries ask the CPU to load an entry and its fields: a list's
 * entries lie scattered over tens of megabytes, so most of them miss every cache. */
#define PREFETCH_DISTANCE 8

static inline void prefetch_entry(PyObject **items, Py_ssize_t position, Py_ssize_t count)
{
    if (position + 2 * PREFETCH_DISTANCE < count)
        __builtin_prefetch(items[position + 2 * PREFETCH_DISTANCE]);
    if (position + PREFETCH_DISTANCE < count) {
        PyObject *ahead = items[position + PREFETCH_DISTANCE];
        if (PyTuple_Check(ahead) && PyTuple_GET_SIZE(ahead) == ENTRY_FIELDS) {
            __builtin_prefetch(PyTuple_GET_ITEM(ahead, 2));
            __builtin_prefetch(PyTuple_GET_ITEM(ahead, 5));
            __builtin_prefetch(PyTuple_GET_ITEM(ahead, 6));
            __builtin_prefetch(PyTuple_GET_ITEM(ahead, 9));
        }
    }
}

/* Replay of long lists in two threads. The calling thread extends PCR 10 in order, which
 * cannot be split, and hashes the template data of the first `split` entries itself. A
 * second thread hashes the template data of the entries from `split` on, publishing how far
 * it got, and then checks every template hash of an algorithm other than the bank's. With
 * such a check, split is half the list, so each thread makes about 1.5 hashes per entry
 * instead of 3 in one thread. Without it, split is 0 and each thread makes one.
 *
 * The second thread reads entries that the caller keeps alive and unchanged: a tuple of
 * tuples of bytes, all immutable, while the calling thread holds the GIL for the whole time,
 * so no Python code runs meanwhile. It calls no Python API. It stops at the first entry of
 * the wrong shape, which the calling thread reports on reaching it, or when `stop` is set. */
typedef struct {
    PyObject **items;
    Py_ssize_t count;
    const Bank *bank;
    const Bank *check;          /* template-hash algorithm other than the bank's, or NULL */
    const Bank *violations;     /* the check_algorithm that defines violations, or NULL */
    Py_ssize_t split;
    unsigned char *measurements; /* bank digests of entries split .. count - 1 */
    unsigned char *mismatched;   /* one flag per entry, when check is set */
    atomic_ptrdiff_t measured;   /* entries from split on whose digest is in measurements */
    atomic_int stop;
} ReplayJob;

/* Return the entry's template hash and data, or 0 if it is not an ImaEntry tuple. */
static inline int entry_hash_and_data(PyObject *entry, PyObject **hash_object, PyObject **data_object)
{
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != ENTRY_FIELDS)
        return 0;
    *hash_object = PyTuple_GET_ITEM(entry, 2);
    *data_object = PyTuple_GET_ITEM(entry, 9);
    return PyBytes_Check(*hash_object) && PyBytes_Check(*data_object);
}

static inline int is_violation(const Bank *check, PyObject *hash_object)
{
    const unsigned char *template_hash = (const unsigned char *)PyBytes_AS_STRING(hash_object);
    Py_ssize_t length = PyBytes_GET_SIZE(hash_object);
    if (check != NULL && length != check->size)
        return 0;
    return all_zero(template_hash, length);
}

static void *replay_helper(void *argument)
{
    ReplayJob *job = argument;
    PyObject *hash_object = NULL, *data_object = NULL;
    const Bank *bank = job->bank;
    Py_ssize_t position;

    for (position = job->split; position < job->count; position++) {
        prefetch_entry(job->items, position, job->count);
        if (!entry_hash_and_data(job->items[position], &hash_object, &data_object))
            break;
        /* A violation's digest is never read: the calling thread extends 0xff bytes. */
        if (!is_violation(job->violations, hash_object))
            bank->hash(PyBytes_AS_STRING(data_object), (size_t)PyBytes_GET_SIZE(data_object), NULL,
                       0, job->measurements + (position - job->split) * bank->size);
        if ((position & 63) == 63) {
            atomic_store_explicit(&job->measured, position + 1 - job->split, memory_order_release);
            if (atomic_load_explicit(&job->stop, memory_order_relaxed))
                return NULL;
        }
    }
    atomic_store_explicit(&job->measured, position - job->split, memory_order_release);
    if (position < job->count || job->check == NULL)
        return NULL;

    const Bank *check = job->check;
    unsigned char expected[MAX_DIGEST];
    for (position = 0; position < job->count; position++) {
        prefetch_entry(job->items, position, job->count);
        if ((position & 1023) == 0 && atomic_load_explicit(&job->stop, memory_order_relaxed))
            break;
        if (!entry_hash_and_data(job->items[position], &hash_object, &data_object))
            break; /* not reached: the loop above read every entry */
        if (is_violation(job->violations, hash_object))
            continue;
        check->hash(PyBytes_AS_STRING(data_object), (size_t)PyBytes_GET_SIZE(data_object), NULL, 0,
                    expected);
        job->mismatched[position] = PyBytes_GET_SIZE(hash_object) != check->size
            || memcmp(expected, PyBytes_AS_STRING(hash_object), check->size) != 0;
    }
    return NULL;
}

/* Wait until the second thread has hashed the entry at `position` (at least split). */
static const unsigned char *await_measurement(ReplayJob *job, Py_ssize_t position)
{
    Py_ssize_t needed = position - job->split + 1;
    for (unsigned spins = 0;
         atomic_load_explicit(&job->measured, memory_order_acquire) < needed; spins++) {
        if (spins >= 64)
            sched_yield();
    }
    return job->measurements + (position - job->split) * job->bank->size;
}

/* Lists shorter than this are replayed in one thread: starting a thread costs more. */
#define PARALLEL_FROM 4096

PyDoc_STRVAR(replay_doc,
"replay(entries, entry_type, bank, initial, quoted, check_algorithm, parallel_from=4096)\n"
"    -> (prefixes, final, mismatched, violations, other_pcr, buffers) or None\n\n"
"Replay entries (a list or tuple of entry_type, ImaEntry) into PCR 10 of bank from initial.\n"
"Return None, for the caller's Python code to take over, when an entry is not an\n"
"entry_type with bytes template hash and data, str template and int index and PCR.\n"
"prefixes lists each prefix length whose value equals quoted (None: no comparison),\n"
"final is the value after all entries, violations and other_pcr the indexes of violations\n"
"and of entries for another PCR, buffers the ima-buf entries. With check_algorithm, a\n"
"violation is a template hash of that algorithm's size that is all zeros, and mismatched\n"
"lists the other entries whose template hash is not that algorithm's digest of their\n"
"template data. Without it, a violation is any all-zero template hash and nothing is\n"
"checked. Lists of parallel_from entries or more are hashed in two threads.");

static PyObject *replay(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *entries, *entry_type, *bank_name, *initial, *quoted, *check_name;
    Py_ssize_t parallel_from = PARALLEL_FROM;
    if (!PyArg_ParseTuple(args, "OO!USOO|n", &entries, &PyType_Type, &entry_type, &bank_name,
                          &initial, &quoted, &check_name, &parallel_from))
        return NULL;

    const Bank *bank = find_bank(bank_name);
    if (bank == NULL) {
        PyErr_Format(PyExc_ValueError, "bank %R is not supported; expected sha1, sha256, sha384 "
                     "or sha512", bank_name);
        return NULL;
    }
    const Bank *check = NULL;
    if (check_name != Py_None) {
        if (!PyUnicode_Check(check_name) || (check = find_bank(check_name)) == NULL) {
            PyErr_Format(PyExc_ValueError, "template hash algorithm %R is not supported; expected "
                         "sha1, sha256, sha384, sha512 or None", check_name);
            return NULL;
        }
    }
    if (PyBytes_GET_SIZE(initial) != bank->size) {
        PyErr_Format(PyExc_ValueError, "initial PCR 10 value has %zd bytes, expected %d for %s",
                     PyBytes_GET_SIZE(initial), bank->size, bank->name);
        return NULL;
    }
    const unsigned char *quoted_bytes = NULL;
    Py_ssize_t quoted_length = -1;
    if (quoted != Py_None) {
        if (!PyBytes_Check(quoted)) {
            PyErr_SetString(PyExc_TypeError, "quoted must be bytes or None");
            return NULL;
        }
        quoted_bytes = (const unsigned char *)PyBytes_AS_STRING(quoted);
        quoted_length = PyBytes_GET_SIZE(quoted);
    }

    /* A tuple, so that nothing can change the entries while a second thread reads them. */
    PyObject *sequence = PySequence_Tuple(entries);
    if (sequence == NULL)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(sequence);
    PyObject **items = &PyTuple_GET_ITEM(sequence, 0);

    PyObject *prefixes = PyList_New(0);
    PyObject *mismatched = PyList_New(0);
    PyObject *violations = PyList_New(0);
    PyObject *other_pcr = PyList_New(0);
    PyObject *buffers = PyList_New(0);
    PyObject *result = NULL;
    int same_algorithm = check == bank;
    const Bank *separate_check = check != NULL && !same_algorithm ? check : NULL;
    ReplayJob job = {items, count, bank, separate_check, check, count, NULL, NULL, 0, 0};
    pthread_t thread;
    int thread_running = 0;
    if (prefixes == NULL || mismatched == NULL || violations == NULL || other_pcr == NULL
        || buffers == NULL)
        goto done;

    if (count >= parallel_from && count > 0) {
        job.split = separate_check != NULL ? count / 2 : 0;
        job.measurements = PyMem_Malloc((size_t)(count - job.split) * (size_t)bank->size);
        job.mismatched = separate_check != NULL ? PyMem_Calloc((size_t)count, 1) : NULL;
        if (job.measurements == NULL || (separate_check != NULL && job.mismatched == NULL)) {
            PyErr_NoMemory();
            goto done;
        }
        thread_running = pthread_create(&thread, NULL, replay_helper, &job) == 0;
        if (!thread_running)
            replay_helper(&job);
    }
    int helper_checks = job.mismatched != NULL;

    unsigned char value[MAX_DIGEST], measurement[MAX_DIGEST], expected[MAX_DIGEST];
    unsigned char violation_extend[MAX_DIGEST];
    memcpy(value, PyBytes_AS_STRING(initial), bank->size);
    memset(violation_extend, 0xff, sizeof(violation_extend));

    if (quoted_bytes != NULL && quoted_length == bank->size
        && memcmp(value, quoted_bytes, bank->size) == 0 && !append_int(prefixes, 0))
        goto done;

    for (Py_ssize_t position = 0; position < count; position++) {
        prefetch_entry(items, position, count);
        PyObject *entry = items[position];
        if (!Py_IS_TYPE(entry, (PyTypeObject *)entry_type) || PyTuple_GET_SIZE(entry) != ENTRY_FIELDS)
            goto not_taken;
        PyObject *index = PyTuple_GET_ITEM(entry, 0);
        PyObject *pcr_object = PyTuple_GET_ITEM(entry, 1);
        PyObject *hash_object = PyTuple_GET_ITEM(entry, 2);
        PyObject *template = PyTuple_GET_ITEM(entry, 3);
        PyObject *data_object = PyTuple_GET_ITEM(entry, 9);
        if (!PyLong_Check(index) || !PyLong_Check(pcr_object) || !PyBytes_Check(hash_object)
            || !PyUnicode_Check(template) || !PyBytes_Check(data_object))
            goto not_taken;
        int overflow;
        long pcr = PyLong_AsLongAndOverflow(pcr_object, &overflow);
        if (pcr == -1 && PyErr_Occurred())
            goto done; /* not reached for an int */
        const unsigned char *template_hash = (const unsigned char *)PyBytes_AS_STRING(hash_object);
        Py_ssize_t template_hash_length = PyBytes_GET_SIZE(hash_object);
        const char *data = PyBytes_AS_STRING(data_object);
        size_t data_length = (size_t)PyBytes_GET_SIZE(data_object);

        const unsigned char *extend_with;
        if (is_violation(check, hash_object)) {
            if (PyList_Append(violations, index) < 0)
                goto done;
            extend_with = violation_extend;
        } else {
            if (position >= job.split) {
                extend_with = await_measurement(&job, position);
            } else {
                bank->hash(data, data_length, NULL, 0, measurement);
                extend_with = measurement;
            }
            if (check != NULL && !helper_checks) {
                const unsigned char *computed = extend_with;
                if (!same_algorithm) {
                    check->hash(data, data_length, NULL, 0, expected);
                    computed = expected;
                }
                if (template_hash_length != check->size
                    || memcmp(computed, template_hash, check->size) != 0) {
                    if (PyList_Append(mismatched, entry) < 0)
                        goto done;
                }
            }
        }

        if (pcr == IMA_PCR && !overflow) {
            bank->hash(value, bank->size, extend_with, bank->size, value);
        } else if (PyList_Append(other_pcr, index) < 0) {
            goto done;
        }
        if (quoted_bytes != NULL && quoted_length == bank->size
            && memcmp(value, quoted_bytes, bank->size) == 0 && !append_int(prefixes, position + 1))
            goto done;
        if (PyUnicode_CompareWithASCIIString(template, "ima-buf") == 0
            && PyList_Append(buffers, entry) < 0)
            goto done;
    }

    if (thread_running) {
        pthread_join(thread, NULL);
        thread_running = 0;
    }
    if (helper_checks) {
        /* Every entry passed the shape checks above, so the second thread checked them all. */
        for (Py_ssize_t position = 0; position < count; position++) {
            if (job.mismatched[position] && PyList_Append(mismatched, items[position]) < 0)
                goto done;
        }
    }

    result = Py_BuildValue("(Oy#OOOO)", prefixes, (const char *)value, (Py_ssize_t)bank->size,
                           mismatched, violations, other_pcr, buffers);
    goto done;

not_taken:
    result = Py_NewRef(Py_None);

done:
    if (thread_running) {
        atomic_store(&job.stop, 1);
        pthread_join(thread, NULL);
    }
    PyMem_Free(job.measurements);
    PyMem_Free(job.mismatched);
    Py_DECREF(sequence);
    Py_XDECREF(prefixes);
    Py_XDECREF(mismatched);
    Py_XDECREF(violations);
    Py_XDECREF(other_pcr);
    Py_XDECREF(buffers);
    return result;
}

/* ---- Runtime policy -------------------------------------------------------------------- */

PyDoc_STRVAR(unlisted_entries_doc,
"unlisted_entries(entries, entry_type, digests, zero_hashes, boot_aggregate_name) -> list\n\n"
"Return, in order, the entries that the runtime policy's fast path does not pass: all but\n"
"the ima and ima-ng entries that are no violation (template hash not in zero_hashes), are\n"
"not named boot_aggregate_name (None: no name is set aside), and whose digest digests (a\n"
"dict of path to bytes or to a container of bytes) lists for their path. The caller runs\n"
"the whole policy check on the returned entries, so an entry that is not an entry_type\n"
"(ImaEntry) is returned too.");

static PyObject *unlisted_entries(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *entries, *entry_type, *digests, *zero_hashes, *boot_aggregate_name;
    if (!PyArg_ParseTuple(args, "OO!O!OO", &entries, &PyType_Type, &entry_type, &PyDict_Type,
                          &digests, &zero_hashes, &boot_aggregate_name))
        return NULL;
    if (boot_aggregate_name != Py_None && !PyUnicode_Check(boot_aggregate_name)) {
        PyErr_SetString(PyExc_TypeError, "boot_aggregate_name must be a str or None");
        return NULL;
    }
    /* A tuple keeps every entry alive for the whole loop, whatever the Python code that
     * comparisons and lookups call does to the caller's list. */
    PyObject *sequence = PySequence_Tuple(entries);
    if (sequence == NULL)
        return NULL;
    PyObject *unlisted = PyList_New(0);
    if (unlisted == NULL) {
        Py_DECREF(sequence);
        return NULL;
    }

    Py_ssize_t count = PyTuple_GET_SIZE(sequence);
    PyObject **items = &PyTuple_GET_ITEM(sequence, 0);
    for (Py_ssize_t position = 0; position < count; position++) {
        prefetch_entry(items, position, count);
        PyObject *entry = items[position];
        int listed = 0;
        if (Py_IS_TYPE(entry, (PyTypeObject *)entry_type) && PyTuple_GET_SIZE(entry) == ENTRY_FIELDS) {
            PyObject *template = PyTuple_GET_ITEM(entry, 3);
            PyObject *path = PyTuple_GET_ITEM(entry, 6);
            PyObject *digest = PyTuple_GET_ITEM(entry, 5);
            int file_template = PyUnicode_Check(template)
                && (PyUnicode_CompareWithASCIIString(template, "ima-ng") == 0
                    || PyUnicode_CompareWithASCIIString(template, "ima") == 0);
            if (file_template) {
                int violation = PySequence_Contains(zero_hashes, PyTuple_GET_ITEM(entry, 2));
                if (violation < 0)
                    goto failed;
                int set_aside = 0;
                if (!violation && boot_aggregate_name != Py_None) {
                    set_aside = PyObject_RichCompareBool(path, boot_aggregate_name, Py_EQ);
                    if (set_aside < 0)
                        goto failed;
                }
                if (!violation && !set_aside) {
                    PyObject *allowed = PyDict_GetItemWithError(digests, path);
                    if (allowed == NULL && PyErr_Occurred())
                        goto failed;
                    if (allowed != NULL) {
                        /* The comparison may run Python code that changes the dict. */
                        Py_INCREF(allowed);
                        listed = PyBytes_CheckExact(allowed)
                            ? PyObject_RichCompareBool(allowed, digest, Py_EQ)
                            : PySequence_Contains(allowed, digest);
                        Py_DECREF(allowed);
                        if (listed < 0)
                            goto failed;
                    }
                }
            }
        }
        if (!listed && PyList_Append(unlisted, entry) < 0)
            goto failed;
    }
    Py_DECREF(sequence);
    return unlisted;

failed:
    Py_DECREF(sequence);
    Py_DECREF(unlisted);
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse_ima_ng", parse_ima_ng, METH_VARARGS, parse_ima_ng_doc},
    {"entries_tuple", entries_tuple, METH_O, entries_tuple_doc},
    {"replay", replay, METH_VARARGS, replay_doc},
    {"unlisted_entries", unlisted_entries, METH_VARARGS, unlisted_entries_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "evidence.ima._accel",
    "Native fast paths for IMA measurement list parsing, replay and runtime policy checks.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel(void)
{
    init_hex_table();
    return PyModule_Create(&module_definition);
}

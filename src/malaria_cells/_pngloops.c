/* The pixel loops of malaria_cells.kernels: undoing PNG's per-row filters, optionally
 * halving the image two rows at a time as it is decoded, the 2x2 block mean, and whole
 * cells from file or bytes to their row of a batch (read_cells, decode_cells).
 *
 * Plain C compiled when the package is installed (setup.py; optional: without a compiler
 * the package decodes with libpng, slower, to the same pixels). The loops release the GIL,
 * so threads decode in parallel, and cost nothing to load (the numba version they replace
 * took ~0.35 s of CPU at the start of every job).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* PNG's Paeth predictor (ties go to left, then up) in stb_image's form: a threshold and
 * two selects, no branch to mispredict on noisy pixels and a short chain from `left` to
 * the result (the specification's if/else chain decodes markedly slower). */
static inline int predict(int left, int up, int up_left)
{
    int threshold = 3 * up_left - (left + up);
    int low = left < up ? left : up, high = left < up ? up : left;
    int closer = high <= threshold ? low : up_left;
    return threshold <= low ? high : closer;
}

static void paeth(const uint8_t *row, const uint8_t *previous, uint8_t *current, Py_ssize_t channels,
                  Py_ssize_t stride)
{
    for (Py_ssize_t i = 0; i < channels; i++)
        current[i] = (uint8_t)(row[i] + previous[i]);
    for (Py_ssize_t i = channels; i < stride; i++)
        current[i] = (uint8_t)(row[i] + predict(current[i - channels], previous[i], previous[i - channels]));
}

/* RGB rows, the common case: the left and upper-left pixels stay in registers, three
 * independent chains side by side. */
static void paeth_rgb(const uint8_t *row, const uint8_t *previous, uint8_t *current, Py_ssize_t width)
{
    int r = 0, g = 0, b = 0, up_r = 0, up_g = 0, up_b = 0;
    for (Py_ssize_t x = 0; x < width; x++) {
        Py_ssize_t i = 3 * x;
        int above_r = previous[i], above_g = previous[i + 1], above_b = previous[i + 2];
        r = (row[i] + predict(r, above_r, up_r)) & 255;
        g = (row[i + 1] + predict(g, above_g, up_g)) & 255;
        b = (row[i + 2] + predict(b, above_b, up_b)) & 255;
        current[i] = (uint8_t)r, current[i + 1] = (uint8_t)g, current[i + 2] = (uint8_t)b;
        up_r = above_r, up_g = above_g, up_b = above_b;
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_SSE41 1

/* predict() on all the channels of a pixel at once, in 16-bit lanes of one register: the
 * chain from one pixel to the next is a handful of single-cycle vector operations, where
 * the scalar form is bound by the count of its instructions (unfiltering and halving a NIH
 * cell: 50 against 57 us).
 * `channels` is a constant in each caller, so the loads and stores compile to fixed code. */
__attribute__((target("sse4.1"), always_inline))
static inline void paeth_sse41(const uint8_t *row, const uint8_t *previous, uint8_t *current,
                               const Py_ssize_t channels, Py_ssize_t width)
{
    const __m128i zero = _mm_setzero_si128();
    __m128i left = zero, up_left = zero;
    for (Py_ssize_t x = 0; x < width; x++) {
        const uint8_t *above = previous + x * channels, *filtered_pixel = row + x * channels;
        uint8_t *target = current + x * channels;
        uint32_t up_bytes = above[0] | (uint32_t)above[1] << 8 | (uint32_t)above[2] << 16;
        uint32_t filtered_bytes = filtered_pixel[0] | (uint32_t)filtered_pixel[1] << 8
                                  | (uint32_t)filtered_pixel[2] << 16;
        if (channels == 4) {
            up_bytes |= (uint32_t)above[3] << 24;
            filtered_bytes |= (uint32_t)filtered_pixel[3] << 24;
        }
        __m128i up = _mm_cvtepu8_epi16(_mm_cvtsi32_si128((int)up_bytes));
        __m128i filtered = _mm_cvtepu8_epi16(_mm_cvtsi32_si128((int)filtered_bytes));
        __m128i threshold = _mm_sub_epi16(_mm_sub_epi16(_mm_add_epi16(_mm_add_epi16(up_left, up_left), up_left), up),
                                          left);
        __m128i low = _mm_min_epi16(left, up), high = _mm_max_epi16(left, up);
        __m128i closer = _mm_blendv_epi8(low, up_left, _mm_cmpgt_epi16(high, threshold));
        __m128i predicted = _mm_blendv_epi8(high, closer, _mm_cmpgt_epi16(threshold, low));
        /* Both < 256, so adding bytes wraps the low byte and leaves the high byte 0: one
         * operation for the sum modulo 256, on the chain to the next pixel. */
        left = _mm_add_epi8(predicted, filtered);
        uint32_t pixel = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(left, zero));
        target[0] = (uint8_t)pixel, target[1] = (uint8_t)(pixel >> 8), target[2] = (uint8_t)(pixel >> 16);
        if (channels == 4)
            target[3] = (uint8_t)(pixel >> 24);
        up_left = up;
    }
}

__attribute__((target("sse4.1")))
static void paeth_sse41_rgb(const uint8_t *row, const uint8_t *previous, uint8_t *current, Py_ssize_t width)
{
    paeth_sse41(row, previous, current, 3, width);
}

__attribute__((target("sse4.1")))
static void paeth_sse41_rgba(const uint8_t *row, const uint8_t *previous, uint8_t *current, Py_ssize_t width)
{
    paeth_sse41(row, previous, current, 4, width);
}
#endif

static int has_sse41, use_sse41;  /* whether this CPU has SSE4.1; whether the loops use it (see simd) */

static void paeth_row(const uint8_t *row, const uint8_t *previous, uint8_t *current, Py_ssize_t channels,
                      Py_ssize_t stride)
{
#ifdef HAVE_SSE41
    if (use_sse41 && channels == 3) {
        paeth_sse41_rgb(row, previous, current, stride / 3);
        return;
    }
    if (use_sse41 && channels == 4) {
        paeth_sse41_rgba(row, previous, current, stride / 4);
        return;
    }
#endif
    if (channels == 3)
        paeth_rgb(row, previous, current, stride / 3);
    else
        paeth(row, previous, current, channels, stride);
}

/* Undo one row's filter (None, Sub, Up, Average, Paeth); 0 on a bad filter byte. */
static int unfilter_row(int kind, const uint8_t *row, const uint8_t *previous, uint8_t *current,
                        Py_ssize_t channels, Py_ssize_t stride)
{
    switch (kind) {
    case 0:
        memcpy(current, row, (size_t)stride);
        return 1;
    case 1:
        for (Py_ssize_t i = 0; i < channels; i++)
            current[i] = row[i];
        for (Py_ssize_t i = channels; i < stride; i++)
            current[i] = (uint8_t)(row[i] + current[i - channels]);
        return 1;
    case 2:
        for (Py_ssize_t i = 0; i < stride; i++)
            current[i] = (uint8_t)(row[i] + previous[i]);
        return 1;
    case 3:
        for (Py_ssize_t i = 0; i < channels; i++)
            current[i] = (uint8_t)(row[i] + (previous[i] >> 1));
        for (Py_ssize_t i = channels; i < stride; i++)
            current[i] = (uint8_t)(row[i] + ((current[i - channels] + previous[i]) >> 1));
        return 1;
    case 4:
        paeth_row(row, previous, current, channels, stride);
        return 1;
    default:
        return 0;
    }
}

/* The rounded mean of four pixels, halves to even: numpy's rint of the float mean. */
static inline uint8_t mean4(int total)
{
    return (uint8_t)((total + 1 + ((total >> 2) & 1)) >> 2);
}

/* Rows `upper` and `lower` (width * channels bytes) -> one row of width / 2 RGB pixels. */
#ifdef HAVE_SSE41
/* The 2x2 means of 8 RGB pixels of two rows (24 bytes each) -> 4 pixels (12 bytes): sums in
 * 16-bit lanes, each lane plus the lane 3 further on (the pixel to its right), rounded, and
 * the lanes of even pixels gathered. */
__attribute__((target("sse4.1")))
static void halve_rgb_sse41(const uint8_t *upper, const uint8_t *lower, Py_ssize_t groups, uint8_t *target)
{
    const __m128i one = _mm_set1_epi16(1), zero = _mm_setzero_si128();
    const __m128i gather_first = _mm_setr_epi8(0, 1, 2, 6, 7, 8, 12, 13, 14, -1, -1, -1, -1, -1, -1, -1);
    const __m128i gather_second = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 4, -1, -1, -1, -1);
    for (Py_ssize_t k = 0; k < groups; k++) {
        const uint8_t *u = upper + 24 * k, *l = lower + 24 * k;
        __m128i u0 = _mm_loadu_si128((const __m128i *)u), l0 = _mm_loadu_si128((const __m128i *)l);
        __m128i u1 = _mm_loadl_epi64((const __m128i *)(u + 16)), l1 = _mm_loadl_epi64((const __m128i *)(l + 16));
        __m128i s0 = _mm_add_epi16(_mm_cvtepu8_epi16(u0), _mm_cvtepu8_epi16(l0));
        __m128i s1 = _mm_add_epi16(_mm_cvtepu8_epi16(_mm_srli_si128(u0, 8)), _mm_cvtepu8_epi16(_mm_srli_si128(l0, 8)));
        __m128i s2 = _mm_add_epi16(_mm_cvtepu8_epi16(u1), _mm_cvtepu8_epi16(l1));
        __m128i v[3] = {_mm_add_epi16(s0, _mm_alignr_epi8(s1, s0, 6)), _mm_add_epi16(s1, _mm_alignr_epi8(s2, s1, 6)),
                        _mm_add_epi16(s2, _mm_srli_si128(s2, 6))};
        for (int i = 0; i < 3; i++)  /* mean4 */
            v[i] = _mm_srli_epi16(_mm_add_epi16(_mm_add_epi16(v[i], one), _mm_and_si128(_mm_srli_epi16(v[i], 2), one)), 2);
        __m128i means = _mm_or_si128(_mm_shuffle_epi8(_mm_packus_epi16(v[0], v[1]), gather_first),
                                     _mm_shuffle_epi8(_mm_packus_epi16(v[2], zero), gather_second));
        _mm_storel_epi64((__m128i *)(target + 12 * k), means);
        uint32_t last = (uint32_t)_mm_extract_epi32(means, 2);
        memcpy(target + 12 * k + 8, &last, 4);
    }
}
#endif

static void halve_rows(const uint8_t *upper, const uint8_t *lower, Py_ssize_t channels, Py_ssize_t width,
                       uint8_t *target)
{
    Py_ssize_t x = 0;
#ifdef HAVE_SSE41
    if (use_sse41 && channels == 3) {
        halve_rgb_sse41(upper, lower, width / 8, target);
        x = width / 8 * 4;
    }
#endif
    for (; x < width / 2; x++) {
        const uint8_t *u = upper + 2 * x * channels, *l = lower + 2 * x * channels;
        for (int c = 0; c < 3; c++)
            target[3 * x + c] = mean4(u[c] + l[c] + u[channels + c] + l[channels + c]);
    }
}

/* Undo the filters of `height` rows (1 filter byte + stride bytes each) into `target`;
 * `zeros`: stride zero bytes, the row above the first. 0 on a bad filter byte. */
static int unfilter_image(const uint8_t *source, Py_ssize_t height, Py_ssize_t stride, Py_ssize_t channels,
                          uint8_t *target, const uint8_t *zeros)
{
    const uint8_t *previous = zeros;
    for (Py_ssize_t y = 0; y < height; y++) {
        const uint8_t *line = source + y * (stride + 1);
        if (!unfilter_row(line[0], line + 1, previous, target + y * stride, channels, stride))
            return 0;
        previous = target + y * stride;
    }
    return 1;
}

/* unfilter_image two rows at a time, each pair halved into a row of (width / 2) RGB pixels
 * of `target`; `rows`: 2 * stride bytes of scratch. height is even. */
static int unfilter_image_halved(const uint8_t *source, Py_ssize_t height, Py_ssize_t stride, Py_ssize_t channels,
                                 uint8_t *target, uint8_t *rows)
{
    Py_ssize_t width = stride / channels, out_stride = width / 2 * 3;
    uint8_t *upper = rows, *lower = rows + stride;
    memset(lower, 0, (size_t)stride);  /* the row above the first */
    for (Py_ssize_t y = 0; y < height; y += 2) {
        const uint8_t *first = source + y * (stride + 1), *second = first + stride + 1;
        if (!unfilter_row(first[0], first + 1, lower, upper, channels, stride)
            || !unfilter_row(second[0], second + 1, upper, lower, channels, stride))
            return 0;
        halve_rows(upper, lower, channels, width, target + y / 2 * out_stride);
    }
    return 1;
}

static int check_sizes(Py_ssize_t height, Py_ssize_t stride, Py_ssize_t channels, const Py_buffer *raw,
                       const Py_buffer *out, Py_ssize_t out_needed)
{
    if (height < 1 || stride < 1 || channels < 1 || channels > 4 || stride % channels) {
        PyErr_SetString(PyExc_ValueError, "bad image geometry");
        return 0;
    }
    if (raw->len < height * (stride + 1) || out->len < out_needed) {
        PyErr_SetString(PyExc_ValueError, "buffer too small for the image");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(unfilter_doc,
"unfilter(raw, height, stride, channels, out) -> bool\n\n"
"Undo PNG's per-row filters of `raw` (height rows of 1 filter byte + stride bytes) into\n"
"`out` (height * stride bytes, writable). False on a bad filter byte.");

/* unfilter and unfilter_halved: the same checks and buffers, then one of the two loops. */
static PyObject *unfilter_call(PyObject *args, int halved)
{
    Py_buffer raw, out;
    Py_ssize_t height, stride, channels;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &raw, &height, &stride, &channels, &out))
        return NULL;
    Py_ssize_t out_stride = halved ? stride / (channels > 0 ? channels : 1) / 2 * 3 : stride;
    int ok = 0, valid = check_sizes(height, stride, channels, &raw, &out, (halved ? height / 2 : height) * out_stride);
    if (valid && halved && height % 2) {
        PyErr_SetString(PyExc_ValueError, "height must be even");
        valid = 0;
    }
    /* halved: two rows of scratch; else the zero row above the first */
    uint8_t *scratch = valid ? calloc(halved ? 2 : 1, (size_t)stride) : NULL;
    if (valid && scratch == NULL)
        PyErr_NoMemory();
    if (scratch != NULL) {
        Py_BEGIN_ALLOW_THREADS
        ok = halved ? unfilter_image_halved(raw.buf, height, stride, channels, out.buf, scratch)
                    : unfilter_image(raw.buf, height, stride, channels, out.buf, scratch);
        Py_END_ALLOW_THREADS
        free(scratch);
    }
    PyBuffer_Release(&raw);
    PyBuffer_Release(&out);
    return scratch == NULL ? NULL : PyBool_FromLong(ok);
}

static PyObject *unfilter(PyObject *module, PyObject *args)
{
    return unfilter_call(args, 0);
}

PyDoc_STRVAR(unfilter_halved_doc,
"unfilter_halved(raw, height, stride, channels, out) -> bool\n\n"
"unfilter, two rows at a time, each pair halved (rounded 2x2 means, halves to even) into\n"
"a row of `out`: (height / 2) x (width / 2) RGB pixels; alpha is dropped. height is even.");

static PyObject *unfilter_halved(PyObject *module, PyObject *args)
{
    return unfilter_call(args, 1);
}

PyDoc_STRVAR(halve_doc,
"halve(images, count, height, width, channels, out)\n\n"
"`images` (count, height, width, channels) uint8 -> `out` (count, height / 2, width / 2,\n"
"channels): rounded 2x2 block means, halves to even.");

static PyObject *halve(PyObject *module, PyObject *args)
{
    Py_buffer images, out;
    Py_ssize_t count, height, width, channels;
    if (!PyArg_ParseTuple(args, "y*nnnnw*", &images, &count, &height, &width, &channels, &out))
        return NULL;
    int valid = count >= 0 && height >= 0 && width >= 0 && channels >= 1
                && images.len >= count * height * width * channels
                && out.len >= count * (height / 2) * (width / 2) * channels;
    if (!valid)
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shape");
    else {
        Py_BEGIN_ALLOW_THREADS
        const uint8_t *source = images.buf;
        uint8_t *target = out.buf;
        Py_ssize_t line = width * channels, half_line = width / 2 * channels;
        for (Py_ssize_t k = 0; k < count; k++) {
            const uint8_t *image = source + k * height * line;
            for (Py_ssize_t y = 0; y < height / 2; y++) {
                const uint8_t *top = image + 2 * y * line, *bottom = top + line;
                uint8_t *row = target + (k * (height / 2) + y) * half_line;
                for (Py_ssize_t x = 0; x < width / 2; x++)
                    for (Py_ssize_t c = 0; c < channels; c++) {
                        Py_ssize_t i = 2 * x * channels + c;
                        row[x * channels + c] = mean4(top[i] + top[i + channels] + bottom[i] + bottom[i + channels]);
                    }
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&images);
    PyBuffer_Release(&out);
    if (!valid)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(simd_doc,
"simd(enabled=None) -> bool\n\n"
"Whether the Paeth filter uses SSE4.1 (where the CPU has it); `enabled` switches it (the\n"
"tests compare both paths; the pixels are the same).");

static PyObject *simd(PyObject *module, PyObject *args)
{
    int enabled = -1;
    if (!PyArg_ParseTuple(args, "|p", &enabled))
        return NULL;
    if (enabled != -1)
        use_sse41 = enabled && has_sse41;
    return PyBool_FromLong(use_sse41);
}

/* ---- Whole cells, bytes to batch row, without the GIL ------------------------------------
 * kernels.py gives these libdeflate's functions (from the copy imagecodecs loads) and the
 * names of the chunks to skip; then read_cells and decode_cells take a task's cells from
 * files or bytes to their rows of the batch in one call: the same checks, inflating and
 * unfiltering as kernels.decode_png_into, but no Python between the steps, so decoding
 * threads do not queue for the GIL (two threads spent ~22 us of CPU more per cell than one). */

typedef void *(*deflate_alloc_fn)(void);
typedef void (*deflate_free_fn)(void *);
typedef int (*zlib_decompress_fn)(void *, const void *, size_t, void *, size_t, size_t *);
typedef uint32_t (*crc32_fn)(uint32_t, const void *, size_t);
static deflate_alloc_fn deflate_alloc;
static deflate_free_fn deflate_free;
static zlib_decompress_fn zlib_decompress;
static crc32_fn crc32_of;
static char ignored_chunks[256];  /* 4-byte names, one after another */
static size_t ignored_count;

PyDoc_STRVAR(set_libdeflate_doc,
"set_libdeflate(alloc_decompressor, free_decompressor, zlib_decompress, crc32, ignored_chunks)\n\n"
"Addresses of libdeflate's functions (ctypes), and the chunk names (4 bytes each) that do\n"
"not change the pixels. Until this is called, read_cells and decode_cells refuse.");

static PyObject *set_libdeflate(PyObject *module, PyObject *args)
{
    unsigned long long alloc, release, decompress, crc;
    Py_buffer names;
    if (!PyArg_ParseTuple(args, "KKKKy*", &alloc, &release, &decompress, &crc, &names))
        return NULL;
    int valid = names.len % 4 == 0 && (size_t)names.len <= sizeof ignored_chunks && alloc && release && decompress
                && crc;
    if (valid) {
        memcpy(ignored_chunks, names.buf, (size_t)names.len);
        ignored_count = (size_t)names.len / 4;
        deflate_alloc = (deflate_alloc_fn)(uintptr_t)alloc;
        deflate_free = (deflate_free_fn)(uintptr_t)release;
        zlib_decompress = (zlib_decompress_fn)(uintptr_t)decompress;
        crc32_of = (crc32_fn)(uintptr_t)crc;
    }
    PyBuffer_Release(&names);
    if (!valid) {
        PyErr_SetString(PyExc_ValueError, "bad libdeflate addresses or chunk names");
        return NULL;
    }
    Py_RETURN_NONE;
}

typedef struct {
    void *decompressor;
    uint8_t *raw, *scratch, *joined, *file;
    size_t raw_size, scratch_size, joined_size, file_size;
} buffers;

static int reserve(uint8_t **buffer, size_t *size, size_t needed)
{
    if (*size >= needed)
        return 1;
    free(*buffer);
    *buffer = malloc(needed);
    *size = *buffer ? needed : 0;
    return *buffer != NULL;
}

static void release_buffers(buffers *b)
{
    if (b->decompressor)
        deflate_free(b->decompressor);
    free(b->raw), free(b->scratch), free(b->joined), free(b->file);
}

static uint32_t big_endian(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static const uint8_t png_start[16] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};

/* The channels (3 or 4) of an 8-bit RGB/RGBA, non-interlaced PNG of side x side or twice
 * that, from its first 33 bytes; 0 for anything else. */
static int cell_channels(const uint8_t *data, size_t size, Py_ssize_t side)
{
    if (size < 33 || memcmp(data, png_start, 16))
        return 0;
    uint32_t width = big_endian(data + 16), height = big_endian(data + 20);
    int channels = data[25] == 2 ? 3 : data[25] == 6 ? 4 : 0;
    if (data[24] != 8 || !channels || data[26] || data[27] || data[28] || width != height
        || (width != (uint32_t)side && width != 2 * (uint32_t)side))
        return 0;
    return channels;
}

static int ignored_chunk(const uint8_t *kind)
{
    for (size_t i = 0; i < ignored_count; i++)
        if (!memcmp(kind, ignored_chunks + 4 * i, 4))
            return 1;
    return 0;
}

/* One PNG (already passed by cell_channels) into its row `target` (side x side x 3). 1 when
 * decoded; 0 for whatever kernels._inflate or the unfiltering would refuse. */
static int decode_cell(const uint8_t *data, size_t size, Py_ssize_t side, int channels, uint8_t *target,
                       buffers *b)
{
    Py_ssize_t width = big_endian(data + 16), stride = width * channels;
    const uint8_t *image = NULL, *previous_kind = NULL;
    size_t image_size = 0, position = 8;
    for (;;) {
        if (position + 12 > size)
            return 0;  /* no IEND: truncated */
        size_t length = big_endian(data + position), stop = position + 8 + length;
        const uint8_t *kind = data + position + 4;
        if (stop + 4 > size || crc32_of(0, kind, length + 4) != big_endian(data + stop))
            return 0;
        if (!memcmp(kind, "IDAT", 4)) {
            if (image != NULL && memcmp(previous_kind, "IDAT", 4))
                return 0;  /* image data split by another chunk */
            if (image == NULL)
                image = data + position + 8, image_size = length;
            else {  /* joined into one stream: at most the file's size */
                if (image != b->joined) {
                    if (!reserve(&b->joined, &b->joined_size, size))
                        return 0;
                    memcpy(b->joined, image, image_size);
                    image = b->joined;
                }
                memcpy(b->joined + image_size, data + position + 8, length);
                image_size += length;
            }
        } else if (!memcmp(kind, "IEND", 4))
            break;
        else if ((memcmp(kind, "IHDR", 4) || position != 8) && !ignored_chunk(kind))
            return 0;
        previous_kind = kind;
        position = stop + 4;
    }
    size_t expected = (size_t)width * (stride + 1), inflated = 0;
    if (image == NULL || !reserve(&b->raw, &b->raw_size, expected))
        return 0;
    if (b->decompressor == NULL && (b->decompressor = deflate_alloc()) == NULL)
        return 0;
    if (zlib_decompress(b->decompressor, image, image_size, b->raw, expected, &inflated) != 0 || inflated != expected)
        return 0;
    if (width == 2 * side)
        return reserve(&b->scratch, &b->scratch_size, 2 * (size_t)stride)
               && unfilter_image_halved(b->raw, width, stride, channels, target, b->scratch);
    /* the model's size: unfiltered where it goes, or beside it for RGBA, whose alpha is dropped */
    size_t pixels_size = channels == 3 ? 0 : (size_t)width * stride;
    if (!reserve(&b->scratch, &b->scratch_size, pixels_size + (size_t)stride))
        return 0;
    uint8_t *zeros = b->scratch + pixels_size, *pixels = channels == 3 ? target : b->scratch;
    memset(zeros, 0, (size_t)stride);
    if (!unfilter_image(b->raw, width, stride, channels, pixels, zeros))
        return 0;
    if (channels == 4)
        for (Py_ssize_t i = 0; i < width * width; i++)
            memcpy(target + 3 * i, pixels + 4 * i, 3);
    return 1;
}

enum { DECODED = 0, ELSEWHERE = -1 };  /* else: an errno */

#ifndef _WIN32
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

static ssize_t read_fully(int fd, uint8_t *buffer, size_t size)
{
    size_t done = 0;
    while (done < size) {
        ssize_t got = read(fd, buffer + done, size - done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return got < 0 ? -1 : (ssize_t)done;
        done += (size_t)got;
    }
    return (ssize_t)done;
}

/* One file: DECODED, ELSEWHERE (not a cell this path takes: the caller reads and decodes it
 * as any other image, and says what is wrong with it), or the errno of a failed read. */
static int read_cell(const char *path, Py_ssize_t side, uint8_t *target, buffers *b)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    struct stat status;
    int result = ELSEWHERE;
    if (fstat(fd, &status) != 0)
        result = errno;
    else if (S_ISDIR(status.st_mode))
        result = EISDIR;
    else if (S_ISREG(status.st_mode) && status.st_size >= 33 && status.st_size <= (1 << 26)
             && reserve(&b->file, &b->file_size, (size_t)status.st_size)) {
        /* A cell is read whole at once; a larger file's header first, as it is seldom a cell. */
        size_t size = (size_t)status.st_size, first = size <= (1 << 20) ? size : 33;
        ssize_t got = read_fully(fd, b->file, first);
        int channels = got == (ssize_t)first ? cell_channels(b->file, size, side) : 0;
        if (got < 0)
            result = errno;
        else if (channels && (first == size || read_fully(fd, b->file + first, size - first) == (ssize_t)(size - first))
                 && decode_cell(b->file, size, side, channels, target, b))
            result = DECODED;
    }
    close(fd);
    return result;
}
#endif

static PyObject *cells_result(const int *results, Py_ssize_t count)
{
    PyObject *list = PyList_New(count);
    for (Py_ssize_t i = 0; list != NULL && i < count; i++) {
        PyObject *item = PyLong_FromLong(results[i]);
        if (item == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static int check_batch(const Py_buffer *out, Py_ssize_t count, Py_ssize_t side)
{
    if (zlib_decompress == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_libdeflate has not been called");
        return 0;
    }
    if (side < 1 || out->len < count * side * side * 3) {
        PyErr_SetString(PyExc_ValueError, "out is smaller than count x side x side x 3");
        return 0;
    }
    return 1;
}

/* One cell held in memory: DECODED or ELSEWHERE, as read_cell. */
static int memory_cell(const uint8_t *data, size_t size, Py_ssize_t side, uint8_t *target, buffers *b)
{
    int channels = cell_channels(data, size, side);
    return channels && decode_cell(data, size, side, channels, target, b) ? DECODED : ELSEWHERE;
}

/* decode_cells and read_cells: each item's bytes (the encoded image, or the file's path) are
 * held as a buffer, then the cells are done without the GIL. */
static PyObject *cells_call(PyObject *args, int from_files)
{
    PyObject *items;
    Py_ssize_t side;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "O!nw*", &PyList_Type, &items, &side, &out))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items), ready = 0;
    int valid = check_batch(&out, count, side);
    Py_buffer *views = valid ? PyMem_Calloc((size_t)count + 1, sizeof(Py_buffer)) : NULL;
    int *results = views ? PyMem_Calloc((size_t)count + 1, sizeof(int)) : NULL;
    PyObject *list = NULL;
    if (valid && results == NULL)
        PyErr_NoMemory();
    for (; results != NULL && ready < count; ready++) {
        PyObject *source = PyList_GET_ITEM(items, ready);
        if (!from_files)
            Py_INCREF(source);
        else if (!PyUnicode_FSConverter(source, &source))  /* a new bytes object */
            break;
        int held = PyObject_GetBuffer(source, &views[ready], PyBUF_SIMPLE);  /* the view keeps source alive */
        Py_DECREF(source);
        if (held < 0)
            break;
    }
    if (results != NULL && ready == count) {
        buffers b = {0};
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count; i++) {
            uint8_t *target = (uint8_t *)out.buf + i * side * side * 3;
#ifndef _WIN32
            if (from_files) {  /* a path: bytes with a terminating NUL, none inside (FSConverter) */
                results[i] = read_cell(views[i].buf, side, target, &b);
                continue;
            }
#endif
            results[i] = memory_cell(views[i].buf, (size_t)views[i].len, side, target, &b);
        }
        release_buffers(&b);
        Py_END_ALLOW_THREADS
        list = cells_result(results, count);
    }
    for (Py_ssize_t i = 0; i < ready; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views), PyMem_Free(results);
    PyBuffer_Release(&out);
    return list;
}

PyDoc_STRVAR(decode_cells_doc,
"decode_cells(contents, side, out) -> list of int\n\n"
"Decode each bytes-like of `contents` into its row of `out` (n, side, side, 3) uint8 where it\n"
"is an 8-bit RGB/RGBA PNG of side or 2 x side pixels that decodes exactly (halved as it is\n"
"decoded, as kernels.decode_png_into). Per item: 0 decoded, -1 left to the caller.");

static PyObject *decode_cells(PyObject *module, PyObject *args)
{
    return cells_call(args, 0);
}

#ifndef _WIN32
PyDoc_STRVAR(read_cells_doc,
"read_cells(paths, side, out) -> list of int\n\n"
"decode_cells for files: each is read (a large one header first) and decoded into its row of\n"
"`out`. Per path: 0 decoded, -1 left to the caller (any other image, or anything unusual),\n"
"or the errno of a failed open or read.");

static PyObject *read_cells(PyObject *module, PyObject *args)
{
    return cells_call(args, 1);
}
#endif

static PyMethodDef methods[] = {
    {"simd", simd, METH_VARARGS, simd_doc},
    {"unfilter", unfilter, METH_VARARGS, unfilter_doc},
    {"unfilter_halved", unfilter_halved, METH_VARARGS, unfilter_halved_doc},
    {"halve", halve, METH_VARARGS, halve_doc},
    {"set_libdeflate", set_libdeflate, METH_VARARGS, set_libdeflate_doc},
    {"decode_cells", decode_cells, METH_VARARGS, decode_cells_doc},
#ifndef _WIN32
    {"read_cells", read_cells, METH_VARARGS, read_cells_doc},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_pngloops", "Compiled pixel loops of malaria_cells.kernels.", -1, methods,
};

PyMODINIT_FUNC PyInit__pngloops(void)
{
#ifdef HAVE_SSE41
    __builtin_cpu_init();
    has_sse41 = use_sse41 = __builtin_cpu_supports("sse4.1");
#endif
    return PyModule_Create(&module_def);
}

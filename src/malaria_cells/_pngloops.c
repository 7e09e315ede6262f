/* The pixel loops of malaria_cells.kernels: undoing PNG's per-row filters, optionally
 * halving the image two rows at a time as it is decoded, and the 2x2 block mean.
 *
 * Plain C compiled when the package is installed (setup.py; optional: without a compiler
 * the package decodes with libpng, as fast as before these loops, and gives the same
 * pixels). The loops release the GIL, so threads decode in parallel, and cost nothing to
 * load (the numba version they replace took ~0.35 s of CPU at the start of every job).
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
#define HAVE_SSE41_PAETH 1

/* predict() on all the channels of a pixel at once, in 16-bit lanes of one register: the
 * chain from one pixel to the next is a handful of single-cycle vector operations, where
 * the scalar form is bound by the count of its instructions (2x the speed on NIH cells).
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

static int has_sse41, use_sse41;  /* whether this CPU has SSE4.1; whether the loops use it */

static void paeth_row(const uint8_t *row, const uint8_t *previous, uint8_t *current, Py_ssize_t channels,
                      Py_ssize_t stride)
{
#ifdef HAVE_SSE41_PAETH
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
static void halve_rows(const uint8_t *upper, const uint8_t *lower, Py_ssize_t channels, Py_ssize_t width,
                       uint8_t *target)
{
    for (Py_ssize_t x = 0; x < width / 2; x++) {
        const uint8_t *u = upper + 2 * x * channels, *l = lower + 2 * x * channels;
        for (int c = 0; c < 3; c++)
            target[3 * x + c] = mean4(u[c] + l[c] + u[channels + c] + l[channels + c]);
    }
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

static PyObject *unfilter(PyObject *module, PyObject *args)
{
    Py_buffer raw, out;
    Py_ssize_t height, stride, channels;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &raw, &height, &stride, &channels, &out))
        return NULL;
    int ok = 0, valid = check_sizes(height, stride, channels, &raw, &out, height * stride);
    uint8_t *zeros = valid ? calloc((size_t)stride, 1) : NULL;
    if (valid && zeros == NULL)
        PyErr_NoMemory();
    if (zeros != NULL) {
        Py_BEGIN_ALLOW_THREADS
        const uint8_t *source = raw.buf, *previous = zeros;
        uint8_t *target = out.buf;
        ok = 1;
        for (Py_ssize_t y = 0; y < height && ok; y++) {
            const uint8_t *line = source + y * (stride + 1);
            ok = unfilter_row(line[0], line + 1, previous, target + y * stride, channels, stride);
            previous = target + y * stride;
        }
        Py_END_ALLOW_THREADS
        free(zeros);
    }
    PyBuffer_Release(&raw);
    PyBuffer_Release(&out);
    return zeros == NULL ? NULL : PyBool_FromLong(ok);
}

PyDoc_STRVAR(unfilter_halved_doc,
"unfilter_halved(raw, height, stride, channels, out) -> bool\n\n"
"unfilter, two rows at a time, each pair halved (rounded 2x2 means, halves to even) into\n"
"a row of `out`: (height / 2) x (width / 2) RGB pixels; alpha is dropped. height is even.");

static PyObject *unfilter_halved(PyObject *module, PyObject *args)
{
    Py_buffer raw, out;
    Py_ssize_t height, stride, channels;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &raw, &height, &stride, &channels, &out))
        return NULL;
    Py_ssize_t width = stride / (channels > 0 ? channels : 1), out_stride = width / 2 * 3;
    int ok = 0, valid = check_sizes(height, stride, channels, &raw, &out, height / 2 * out_stride);
    if (valid && height % 2) {
        PyErr_SetString(PyExc_ValueError, "height must be even");
        valid = 0;
    }
    uint8_t *rows = valid ? calloc(2 * (size_t)stride, 1) : NULL;
    if (valid && rows == NULL)
        PyErr_NoMemory();
    if (rows != NULL) {
        Py_BEGIN_ALLOW_THREADS
        const uint8_t *source = raw.buf;
        uint8_t *upper = rows, *lower = rows + stride, *target = out.buf;  /* lower: zeros, the row above the first */
        ok = 1;
        for (Py_ssize_t y = 0; y < height && ok; y += 2) {
            const uint8_t *first = source + y * (stride + 1), *second = first + stride + 1;
            ok = unfilter_row(first[0], first + 1, lower, upper, channels, stride)
                 && unfilter_row(second[0], second + 1, upper, lower, channels, stride);
            if (ok)
                halve_rows(upper, lower, channels, width, target + y / 2 * out_stride);
        }
        Py_END_ALLOW_THREADS
        free(rows);
    }
    PyBuffer_Release(&raw);
    PyBuffer_Release(&out);
    return rows == NULL ? NULL : PyBool_FromLong(ok);
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

static PyMethodDef methods[] = {
    {"simd", simd, METH_VARARGS, simd_doc},
    {"unfilter", unfilter, METH_VARARGS, unfilter_doc},
    {"unfilter_halved", unfilter_halved, METH_VARARGS, unfilter_halved_doc},
    {"halve", halve, METH_VARARGS, halve_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_pngloops", "Compiled pixel loops of malaria_cells.kernels.", -1, methods,
};

PyMODINIT_FUNC PyInit__pngloops(void)
{
#ifdef HAVE_SSE41_PAETH
    __builtin_cpu_init();
    has_sse41 = use_sse41 = __builtin_cpu_supports("sse4.1");
#endif
    return PyModule_Create(&module_def);
}

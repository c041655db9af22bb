/*
 * Compiled CPU kernel of the progressive anchor search (anchor_former.search, method="native").
 *
 * Same rules as the PyTorch paths, bit for bit: scores are float32 (fp16/bf16 are upcast exactly by
 * the caller); each score maps to the order-preserving int32 image of its bits, with -0.0 and +0.0
 * both mapped to 0, and ties go to the lower token index. Per sample, heads are visited in index
 * order and head h adds its quota[h] best tokens that no earlier head took.
 *
 * Per (sample, head) row the selection is exact and cheap: the keys of the row are written once
 * (taken and padded tokens struck out), the maxima of blocks of 16 tokens are taken, and the q-th
 * largest block maximum tau is a lower bound of the q-th best key (q blocks hold a key >= tau). Only
 * blocks whose maximum reaches tau are scanned. A small quota (q <= SMALL_QUOTA) goes into a best-first
 * buffer of q entries; a large one would make that buffer O(candidates * q), so its candidates are
 * packed into unique 64-bit keys (key, then lower index first) and the q-th largest is found by a
 * quickselect (expected linear; a sort finishes it if the partitions degenerate), O(M) per head.
 *
 * Every argument of the entry point is checked here (sizes, strides, quotas, prefix, output width),
 * not only by the Python caller: the kernel reads raw memory, so a bad argument must raise, never read
 * out of bounds (scripts/sanitize_native.sh runs the tests under AddressSanitizer and UBSan).
 *
 * Samples are independent, so a large batch is split over up to torch.get_num_threads() POSIX threads
 * (one thread on Windows); results do not depend on the split. No Python objects are touched while the
 * GIL is released. Built by setup.py as an optional extension: without a C compiler the package falls
 * back to the PyTorch paths.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <pthread.h>
#define ANCHOR_FORMER_PTHREADS 1
#endif

#define BLOCK 16
#define STRUCK INT32_MIN /* below every real key: the smallest key of a float is INT32_MIN + 1 */

/* Order-preserving int32 image of a float32's bits; -0.0 and +0.0 share the key 0. */
static inline int32_t order_key(uint32_t bits) {
    int32_t b = (int32_t)bits;
    int32_t sign = -(int32_t)(bits >> 31); /* -1 for negative floats, else 0 */
    return (b ^ (sign & 0x7FFFFFFF)) - sign;
}

static inline int is_nonfinite(uint32_t bits) { return (bits & 0x7F800000u) == 0x7F800000u; }

static inline uint32_t load_bits(const float *p) {
    uint32_t bits;
    memcpy(&bits, p, sizeof bits);
    return bits;
}

/*
 * Insert (key, j) into the best-first buffer keys/idx holding *len of at most q entries. j is larger
 * than every index in the buffer, so it goes after entries with an equal key. When the buffer is full
 * the caller has checked key > keys[q - 1], and the last entry is dropped.
 */
static inline void insert_best(int32_t *keys, int64_t *idx, int64_t *len, int64_t q, int32_t key, int64_t j) {
    int64_t p = *len < q ? *len : q - 1;
    while (p > 0 && keys[p - 1] < key) {
        keys[p] = keys[p - 1];
        idx[p] = idx[p - 1];
        --p;
    }
    keys[p] = key;
    idx[p] = j;
    if (*len < q) ++*len;
}

/* The q-th largest of values[0:n] (q <= n), using keys[0:q] as scratch. */
static int32_t kth_largest(const int32_t *values, int64_t n, int64_t q, int32_t *keys, int64_t *idx) {
    int64_t len = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (len < q || values[i] > keys[q - 1]) insert_best(keys, idx, &len, q, values[i], i);
    }
    return keys[q - 1];
}

#define TAKEN 1
#define PADDED 2
#define SMALL_QUOTA 32 /* up to this quota the best-first buffer beats the quickselect */

/* Unique 64-bit key of token j of a row of m candidates: its 32-bit key, then the lower index first.
   key * 2^32 + (m - 1 - j) never overflows: |key| <= 2^31 and 0 <= m - 1 - j < 2^31. */
static inline int64_t wide_key(int32_t key, int64_t j, int64_t m) { return (int64_t)key * 4294967296LL + (m - 1 - j); }

static int compare_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

/* The q-th largest of the n distinct values in a (1 <= q <= n); reorders a. Quickselect with a
   median-of-three pivot; after 2 log2(n) + 8 rounds the rest is sorted, so the worst case is
   O(n log n). */
static int64_t select_qth_largest(int64_t *a, int64_t n, int64_t q) {
    int64_t lo = 0, hi = n - 1, k = q - 1;
    int budget = 8;
    for (int64_t t = n; t > 1; t >>= 1) budget += 2;
    while (lo < hi) {
        if (budget-- == 0) {
            qsort(a + lo, (size_t)(hi - lo + 1), sizeof *a, compare_desc);
            return a[k];
        }
        int64_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        int64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) { /* descending: [lo, j] >= pivot >= [i, hi] */
            while (a[i] > pivot) ++i;
            while (a[j] < pivot) --j;
            if (i <= j) {
                int64_t tmp = a[i];
                a[i] = a[j];
                a[j] = tmp;
                ++i;
                --j;
            }
        }
        if (k <= j) {
            hi = j;
        } else if (k >= i) {
            lo = i;
        } else {
            return a[k]; /* j < k < i: a[k] == pivot */
        }
    }
    return a[k];
}

typedef struct {
    int64_t batch, heads, tokens, prefix;      /* B, H, N, leading tokens that are never anchors */
    int64_t stride_b, stride_h, stride_n;      /* element strides of the (B, H, N) scores */
    const int64_t *quotas;                     /* (H,) anchors each head adds */
    int64_t qmax;
    int check_finite;
    const uint8_t *mask;                       /* (B, N) True = real token, or NULL: no padding */
    int64_t mask_stride_b, mask_stride_n;
} Problem;

/* Scratch for one sample; M = N - prefix candidates, NB blocks. */
typedef struct {
    int32_t *work;   /* (M,) keys of the current head row, taken tokens struck */
    int32_t *bmax;   /* (NB,) block maxima */
    uint8_t *taken;  /* (M,) TAKEN by an earlier head, PADDED (never a candidate) or 0 */
    int32_t *keys;   /* (max(qmax, 1),) best-first buffer */
    int64_t *idx;
    int32_t *cand;   /* (M,) candidate tokens, or block maxima while tau is searched */
    int64_t *wide;   /* (M,) unique 64-bit keys of the candidates of a large quota */
} Scratch;

/* Write the keys of one head row into work (taken and padded tokens struck, both marked in
   unavailable) and return its non-finite count. */
static int64_t load_row(const float *row, int64_t stride_n, int64_t m, const uint8_t *unavailable, int32_t *work) {
    int64_t bad = 0;
    if (stride_n == 1) {
        for (int64_t j = 0; j < m; ++j) {
            uint32_t bits = load_bits(row + j);
            bad += is_nonfinite(bits);
            int32_t key = order_key(bits);
            work[j] = unavailable[j] ? STRUCK : key;
        }
    } else {
        for (int64_t j = 0; j < m; ++j) {
            uint32_t bits = load_bits(row + j * stride_n);
            bad += is_nonfinite(bits);
            int32_t key = order_key(bits);
            work[j] = unavailable[j] ? STRUCK : key;
        }
    }
    return bad;
}

static int64_t count_nonfinite(const float *row, int64_t stride_n, int64_t n) {
    int64_t bad = 0;
    for (int64_t j = 0; j < n; ++j) bad += is_nonfinite(load_bits(row + j * stride_n));
    return bad;
}

/* Head h's quota q of the best available tokens: marks them TAKEN. The caller has checked that at
   least q tokens of the row are available (not struck). */
static void select_head(Scratch *s, int64_t m, int64_t q) {
    int64_t nb = (m + BLOCK - 1) / BLOCK;
    for (int64_t blk = 0; blk < nb; ++blk) {
        int64_t lo = blk * BLOCK, hi = lo + BLOCK < m ? lo + BLOCK : m;
        int32_t best = STRUCK;
        for (int64_t j = lo; j < hi; ++j) best = s->work[j] > best ? s->work[j] : best;
        s->bmax[blk] = best;
    }
    /* tau: a lower bound of the q-th best key, so smaller keys are never needed. */
    int32_t tau = STRUCK;
    if (q <= nb) {
        /* A loose bound first: split the blocks into q runs; each run holds a key >= its maximum, so
           at least q keys are >= the smallest run maximum. */
        int32_t loose = INT32_MAX;
        for (int64_t r = 0; r < q; ++r) {
            int32_t run_max = STRUCK;
            for (int64_t i = r * nb / q; i < (r + 1) * nb / q; ++i) {
                run_max = s->bmax[i] > run_max ? s->bmax[i] : run_max;
            }
            loose = run_max < loose ? run_max : loose;
        }
        /* Then the tight one: the q-th largest block maximum (q blocks hold a key >= it), searched
           among the few maxima that reach the loose bound (at least q of them). With a small quota
           the best-first buffer finds it; a large one goes to the quickselect. */
        int64_t c = 0;
        for (int64_t i = 0; i < nb; ++i) {
            if (q <= SMALL_QUOTA) {
                s->cand[c] = s->bmax[i];
            } else {
                s->wide[c] = s->bmax[i];
            }
            c += s->bmax[i] >= loose;
        }
        tau = q <= SMALL_QUOTA ? kth_largest(s->cand, c, q, s->keys, s->idx) : (int32_t)select_qth_largest(s->wide, c, q);
    }
    /* Candidates: the available tokens whose key reaches tau (about q of them), in index order. A
       struck token (STRUCK) reaches tau only when tau is STRUCK; it is never a candidate. */
    int64_t c = 0;
    for (int64_t blk = 0; blk < nb; ++blk) {
        if (s->bmax[blk] < tau || s->bmax[blk] == STRUCK) continue;
        int64_t lo = blk * BLOCK, hi = lo + BLOCK < m ? lo + BLOCK : m;
        for (int64_t j = lo; j < hi; ++j) {
            s->cand[c] = (int32_t)j;
            c += s->work[j] >= tau && s->work[j] != STRUCK;
        }
    }
    if (q <= SMALL_QUOTA) {
        int64_t len = 0;
        for (int64_t i = 0; i < c; ++i) {
            int32_t key = s->work[s->cand[i]];
            if (len < q || key > s->keys[q - 1]) insert_best(s->keys, s->idx, &len, q, key, s->cand[i]);
        }
        for (int64_t i = 0; i < q; ++i) s->taken[s->idx[i]] = TAKEN;
        return;
    }
    for (int64_t i = 0; i < c; ++i) s->wide[i] = wide_key(s->work[s->cand[i]], s->cand[i], m);
    int64_t worst = select_qth_largest(s->wide, c, q); /* keys are unique: exactly q reach it */
    for (int64_t i = 0; i < c; ++i) {
        if (wide_key(s->work[s->cand[i]], s->cand[i], m) >= worst) s->taken[s->cand[i]] = TAKEN;
    }
}

/* Samples [first, last) of the batch. Returns the number of non-finite scores seen (0 when check_finite is
   off), NO_MEMORY on allocation failure or TOO_FEW_TOKENS when a padded sample has fewer available
   tokens than a head's quota. */
#define NO_MEMORY (-1)
#define TOO_FEW_TOKENS (-2)

static int64_t run_search(const Problem *p, const float *scores, int64_t *out, int64_t out_stride_b, int include_cls,
                          int64_t first, int64_t last) {
    int64_t m = p->tokens - p->prefix;
    int64_t nb = (m + BLOCK - 1) / BLOCK;
    int64_t qcap = p->qmax > 0 ? p->qmax : 1; /* the best-first buffer; kth_largest needs q entries too */
    int64_t mcap = m > 0 ? m : 1;
    Scratch s;
    s.work = (int32_t *)malloc((size_t)mcap * sizeof(int32_t));
    s.bmax = (int32_t *)malloc((size_t)(nb > 0 ? nb : 1) * sizeof(int32_t));
    s.taken = (uint8_t *)malloc((size_t)mcap);
    s.keys = (int32_t *)malloc((size_t)qcap * sizeof(int32_t));
    s.idx = (int64_t *)malloc((size_t)qcap * sizeof(int64_t));
    s.cand = (int32_t *)malloc((size_t)mcap * sizeof(int32_t));
    s.wide = p->qmax > SMALL_QUOTA ? (int64_t *)malloc((size_t)mcap * sizeof(int64_t)) : NULL;
    int64_t bad = 0;
    if (!s.work || !s.bmax || !s.taken || !s.keys || !s.idx || !s.cand || (p->qmax > SMALL_QUOTA && !s.wide)) {
        bad = NO_MEMORY;
        goto done;
    }
    for (int64_t b = first; b < last; ++b) {
        int64_t available = m;
        if (p->mask) {
            const uint8_t *real = p->mask + b * p->mask_stride_b + p->prefix * p->mask_stride_n;
            for (int64_t j = 0; j < m; ++j) {
                s.taken[j] = real[j * p->mask_stride_n] ? 0 : PADDED;
                available -= !real[j * p->mask_stride_n];
            }
        } else {
            memset(s.taken, 0, (size_t)m);
        }
        for (int64_t h = 0; h < p->heads; ++h) {
            const float *row = scores + b * p->stride_b + h * p->stride_h;
            int64_t q = p->quotas[h];
            if (p->check_finite) bad += count_nonfinite(row, p->stride_n, p->prefix);
            if (q == 0) {
                if (p->check_finite) bad += count_nonfinite(row + p->prefix * p->stride_n, p->stride_n, m);
                continue;
            }
            if (available < q) {
                bad = TOO_FEW_TOKENS;
                goto done;
            }
            int64_t row_bad = load_row(row + p->prefix * p->stride_n, p->stride_n, m, s.taken, s.work);
            if (p->check_finite) bad += row_bad;
            select_head(&s, m, q);
            available -= q;
        }
        int64_t *o = out + b * out_stride_b;
        int64_t c = 0;
        if (include_cls) o[c++] = 0;
        for (int64_t j = 0; j < m; ++j) {
            if (s.taken[j] == TAKEN) o[c++] = j + p->prefix;
        }
    }
done:
    free(s.work);
    free(s.bmax);
    free(s.taken);
    free(s.keys);
    free(s.idx);
    free(s.cand);
    free(s.wide);
    return bad;
}

/* Samples are independent: a large batch is split into contiguous ranges, one per thread. */
typedef struct {
    const Problem *p;
    const float *scores;
    int64_t *out;
    int64_t out_stride_b, first, last, result;
    int include_cls;
} Job;

static void *run_job(void *arg) {
    Job *job = (Job *)arg;
    job->result = run_search(job->p, job->scores, job->out, job->out_stride_b, job->include_cls, job->first, job->last);
    return NULL;
}

#define MIN_SCORES_PER_THREAD 65536 /* below this a thread costs more to start than it saves */

static int64_t run_threaded(const Problem *p, const float *scores, int64_t *out, int64_t out_stride_b,
                            int include_cls, int64_t max_threads) {
    int64_t work = p->batch * p->heads * p->tokens;
    int64_t n = work / MIN_SCORES_PER_THREAD;
    if (n > max_threads) n = max_threads;
    if (n > p->batch) n = p->batch;
    if (n > 64) n = 64;
    if (n < 1) n = 1;
    Job jobs[64];
    for (int64_t t = 0; t < n; ++t) {
        Job job = {p, scores, out, out_stride_b, p->batch * t / n, p->batch * (t + 1) / n, 0, include_cls};
        jobs[t] = job;
    }
#ifdef ANCHOR_FORMER_PTHREADS
    pthread_t threads[64];
    int started[64] = {0};
    for (int64_t t = 1; t < n; ++t) started[t] = pthread_create(&threads[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int64_t t = 1; t < n; ++t) {
        if (started[t]) {
            pthread_join(threads[t], NULL);
        } else {
            run_job(&jobs[t]); /* could not start a thread: do its share here */
        }
    }
#else
    for (int64_t t = 0; t < n; ++t) run_job(&jobs[t]);
#endif
    int64_t bad = 0;
    for (int64_t t = 0; t < n; ++t) {
        if (jobs[t].result < 0) return jobs[t].result;
        bad += jobs[t].result;
    }
    return bad;
}

PyDoc_STRVAR(search_doc,
             "search(scores_ptr, batch, heads, tokens, stride_b, stride_h, stride_n, prefix, quotas, out_ptr, "
             "out_stride_b, out_width, include_cls, check_finite, max_threads, mask_ptr, mask_stride_b, "
             "mask_stride_n) -> int\n\n"
             "Anchor search over float32 scores (B, H, N) at scores_ptr, written to the int64 rows (B, out_width)\n"
             "at out_ptr. mask_ptr (0 for none) points at (B, N) bools, True = real token; padded tokens are\n"
             "never anchors. Returns the number of non-finite scores seen (0 when check_finite is false). Large\n"
             "batches are split over up to max_threads threads. Every argument is checked (ValueError).\n"
             "Called by anchor_former.search with validated tensors; not a public API.");

/* Raise ValueError naming the argument unless lo <= value <= hi. */
static int check_range(const char *name, long long value, long long lo, long long hi) {
    if (value < lo || value > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in [%lld, %lld], got %lld", name, lo, hi, value);
        return 0;
    }
    return 1;
}

static PyObject *native_search(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long scores_ptr, out_ptr, mask_ptr;
    Py_ssize_t batch, heads, tokens, stride_b, stride_h, stride_n, prefix, out_stride_b, out_width, max_threads;
    Py_ssize_t mask_stride_b, mask_stride_n;
    PyObject *quota_seq;
    int include_cls, check_finite;
    if (!PyArg_ParseTuple(args, "KnnnnnnnOKnnppnKnn", &scores_ptr, &batch, &heads, &tokens, &stride_b, &stride_h,
                          &stride_n, &prefix, &quota_seq, &out_ptr, &out_stride_b, &out_width, &include_cls,
                          &check_finite, &max_threads, &mask_ptr, &mask_stride_b, &mask_stride_n)) {
        return NULL;
    }
    /* Sizes: token indices are stored as int32 while searching, and B * H * N must fit an int64. */
    const long long big = INT32_MAX;
    if (!check_range("batch", batch, 0, big) || !check_range("heads", heads, 0, big) ||
        !check_range("tokens", tokens, 0, big) || !check_range("prefix", prefix, 0, tokens) ||
        !check_range("stride_b", stride_b, 0, INT64_MAX / (big + 1)) ||
        !check_range("stride_h", stride_h, 0, INT64_MAX / (big + 1)) ||
        !check_range("stride_n", stride_n, 0, INT64_MAX / (big + 1)) ||
        !check_range("include_cls", include_cls, 0, prefix > 0) ||
        !check_range("max_threads", max_threads, 1, 1 << 20)) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(quota_seq, "quotas must be a sequence of ints");
    if (!fast) return NULL;
    Py_ssize_t nq = PySequence_Fast_GET_SIZE(fast);
    if (nq != heads) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "quotas must have %zd entries (one per head), got %zd", heads, nq);
        return NULL;
    }
    int64_t *quotas = (int64_t *)malloc((size_t)(nq > 0 ? nq : 1) * sizeof(int64_t));
    if (!quotas) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    int64_t qmax = 0, qsum = 0, candidates = tokens - prefix;
    for (Py_ssize_t i = 0; i < nq; ++i) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            free(quotas);
            Py_DECREF(fast);
            return NULL;
        }
        /* Each quota in [0, candidates] and the running sum too (no overflow: both <= 2^31). */
        if (v < 0 || v > candidates || qsum + v > candidates) {
            free(quotas);
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError,
                         "quotas[%zd] = %lld: each quota must be >= 0 and the quotas must sum to at most the "
                         "%lld candidate tokens (tokens - prefix), got a sum of %lld before it",
                         i, v, (long long)candidates, (long long)qsum);
            return NULL;
        }
        quotas[i] = v;
        qmax = v > qmax ? v : qmax;
        qsum += v;
    }
    Py_DECREF(fast);
    int64_t width = qsum + include_cls;
    if (out_width != width || !check_range("out_stride_b", out_stride_b, batch > 1 ? width : 0, INT64_MAX / (big + 1))) {
        free(quotas);
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError, "out_width must be sum(quotas) + include_cls = %lld, got %zd",
                         (long long)width, out_width);
        }
        return NULL;
    }
    int64_t work = (int64_t)batch * heads * tokens;
    if ((work > 0 && scores_ptr == 0) || (batch > 0 && width > 0 && out_ptr == 0) ||
        (mask_ptr != 0 && (mask_stride_b < 0 || mask_stride_n < 0 || mask_stride_b > INT64_MAX / (big + 1) ||
                           mask_stride_n > INT64_MAX / (big + 1)))) {
        free(quotas);
        PyErr_SetString(PyExc_ValueError, "scores_ptr and out_ptr must be non-null for a non-empty problem, and "
                                          "mask strides must be >= 0");
        return NULL;
    }
    Problem p = {batch, heads, tokens, prefix, stride_b, stride_h, stride_n, quotas, qmax, check_finite,
                 (const uint8_t *)(uintptr_t)mask_ptr, mask_stride_b, mask_stride_n};
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = run_threaded(&p, (const float *)(uintptr_t)scores_ptr, (int64_t *)(uintptr_t)out_ptr, out_stride_b,
                       include_cls, max_threads);
    Py_END_ALLOW_THREADS
    free(quotas);
    if (bad == NO_MEMORY) return PyErr_NoMemory();
    if (bad == TOO_FEW_TOKENS) {
        PyErr_SetString(PyExc_ValueError, "a sample has fewer real (unpadded) candidate tokens than the anchors "
                                          "its heads must add");
        return NULL;
    }
    return PyLong_FromLongLong(bad);
}

static PyMethodDef native_methods[] = {
    {"search", native_search, METH_VARARGS, search_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native", "Compiled CPU kernel of the anchor search.", -1, native_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }

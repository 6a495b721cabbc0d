/* prism_rt's C ABI: PRISM counterfactual edits from C, C++ or any language with a C FFI.
 *
 * libprism_rt_c embeds CPython (one interpreter per process) and runs the Python package prism_rt
 * inside it (prism_rt/c_api.py); only C types cross this boundary.
 *
 *   prism_init("/path/to/.venv");                       // once per process
 *   prism_engine* engine = prism_engine_load("engines/phantom-demo", "{\"threads\": 2}");
 *   const char* targets[] = {"Chest X-ray showing No Finding"};
 *   prism_result* result = NULL;
 *   if (prism_edit(engine, "cxr.png", NULL, 0, 0, 0, "Chest X-ray showing No Finding, Support Devices",
 *                  targets, 1, "{\"steps\": 50}", &result) != PRISM_OK)
 *       fprintf(stderr, "error: %s\n", prism_last_error());
 *   int h, w; const uint16_t* pixels = prism_result_image(result, 0, &h, &w);
 *   prism_result_free(result); prism_engine_free(engine); prism_shutdown();
 *
 * Threads: after prism_init every function may be called from any thread; one engine may serve
 * many threads at once (each call takes the GIL for its Python parts; ONNX Runtime and torch
 * release it inside the graphs), and N threads give exactly a serial run's outputs.
 *
 * Options are JSON objects whose keys are `prism-rt edit`'s long flags with underscores; NULL or
 * "" means all defaults (PRISM's published settings). An unknown key, or a value of the wrong type
 * or range, is refused with PRISM_ERROR and a message naming it.
 */
#ifndef PRISM_RT_H
#define PRISM_RT_H

#include <stdint.h>

#if defined(_WIN32)
#define PRISM_API __declspec(dllexport)
#else
#define PRISM_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct prism_engine prism_engine;
typedef struct prism_result prism_result;

/* Status codes; prism_last_error() gives the one-line message of any non-zero one. */
enum prism_status {
    PRISM_OK = 0,
    PRISM_ERROR = 1,           /* prism_rt refused the request (settings, image, prompt, model): PrismError's text */
    PRISM_INVALID_ARGUMENT = 2, /* a NULL or out-of-range argument at this boundary */
    PRISM_NOT_INITIALIZED = 3,  /* prism_init was not called, failed, or prism_shutdown was called */
    PRISM_INTERNAL = 4          /* an unexpected Python exception: "<type>: <text>" */
};

/* Start the interpreter and import prism_rt. `venv`: a virtual environment's folder (the one
 * holding pyvenv.cfg) or its site-packages folder; its packages (prism_rt among them) are then the
 * only third-party ones seen, as in the venv itself. NULL: the interpreter's own sys.path
 * (PYTHONPATH / PYTHONHOME of the environment). The Python standard library comes from the
 * libpython the host links (its build prefix, or PYTHONHOME). Call once per process; a second
 * call returns PRISM_OK without doing anything. Not thread-safe against itself. */
PRISM_API int prism_init(const char* venv);

/* An engine folder (ONNX Runtime) or a diffusers checkpoint (torch backend); NULL on error.
 * options_json keys: precision ("fp32", "fp16", "int8-cpu"…), device ("cpu", "cuda:0",
 * "tensorrt:0"), threads, backend, self_max_queries, no_cpu_arena, portable_graphs, trt_cache
 * (a folder or "off"), unet_weights, config, allow_pickle. */
PRISM_API prism_engine* prism_engine_load(const char* path, const char* options_json);

/* Invert one image under `source_caption` and edit it to each of `targets` (n_targets ≥ 1).
 * The image: a file path (PNG, JPEG or DICOM) in `image_path`, or a grey pixel buffer in
 * `pixels` (row-major height × width, `bits` 8 → uint8, 16 → uint16 in native byte order, white =
 * dense), exactly one of the two non-NULL (height, width, bits are ignored with a path).
 * options_json keys: inversion ("direct", "negative-prompt", "ddim", "null-text" on torch), steps,
 * guidance, fit ("resize", "crop", "pad"), null_inner_steps, max_pixels, mode, cross_replace,
 * self_replace (a number or a list), edit_weight, edit_words, blend_words ([src, edit]),
 * blend_threshold, blend_dilation, edit_negative ("empty" or "source"), noise_blend, noise_blend_threshold,
 * composite, legacy, max_batch.
 * On PRISM_OK *out holds a result the caller frees with prism_result_free; on error *out is NULL. */
PRISM_API int prism_edit(prism_engine* engine, const char* image_path, const void* pixels, int height, int width,
                         int bits, const char* source_caption, const char* const* targets, int n_targets,
                         const char* options_json, prism_result** out);

/* The number of counterfactuals: one per item (target × self_replace value × …), in
 * result.json's item order; -1 for a NULL result. */
PRISM_API int prism_result_count(const prism_result* result);

/* Counterfactual k at the input image's geometry (its height × width; with fit "crop", the crop
 * box's), grey, 16 bits in [0, 65535] whatever the input's bit depth (round(x · 65535) of the
 * [0, 1] image: the Python API's images()[k]). Row-major, owned by the result (valid until
 * prism_result_free). NULL (and PRISM_INVALID_ARGUMENT in prism_last_error) for a bad k. */
PRISM_API const uint16_t* prism_result_image(const prism_result* result, int k, int* height, int* width);

/* The result.json-like record (UTF-8 JSON): prompts, inversion, items with their statistics,
 * timings, counts, settings, warnings, provenance. Owned by the result. */
PRISM_API const char* prism_result_json(const prism_result* result);

PRISM_API void prism_result_free(prism_result* result);
PRISM_API void prism_engine_free(prism_engine* engine);

/* The calling thread's last error message (one line; "" if none). Valid until this thread's next call. */
PRISM_API const char* prism_last_error(void);

/* Finalise the interpreter, from the thread that called prism_init, once no other thread is in a
 * prism_* call; free every engine first (one freed later is only released, never decref'd). After
 * it the library cannot be initialised again in this process (CPython's extension modules, numpy
 * and onnxruntime among them, do not survive a second interpreter). A host that runs until exit
 * may skip it. Where the host process already ran Python, prism_init used that interpreter and
 * prism_shutdown leaves it running. */
PRISM_API void prism_shutdown(void);

#ifdef __cplusplus
}
#endif

#endif /* PRISM_RT_H */

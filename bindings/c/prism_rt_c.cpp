// libprism_rt_c: the C ABI of prism_rt.h over an embedded CPython running prism_rt.c_api.
// The work and the checks are in Python; this file converts types, holds the GIL for each call
// and turns Python exceptions into status codes and a thread-local message.
#include "prism_rt.h"

#include <pybind11/embed.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace py = pybind11;

struct prism_engine {
    py::object engine;
};

struct prism_result {  // plain C++ copies: freed without the GIL
    std::vector<std::vector<uint16_t>> images;
    std::vector<std::pair<int, int>> shapes;
    std::string json;
};

namespace {

enum class State { fresh, running, stopped };
std::atomic<State> g_state{State::fresh};
bool g_owns_interpreter = false;         // false where the host process already ran Python
PyThreadState* g_init_thread = nullptr;  // saved by prism_init so host threads can take the GIL
py::object* g_api = nullptr;             // prism_rt.c_api; heap-held so no destructor runs after finalize
py::object* g_prism_error = nullptr;     // prism_rt.errors.PrismError
thread_local std::string g_error;

int fail(int status, std::string message) {
    g_error = std::move(message);
    return status;
}

// The venv's site-packages: `path` is a venv (it holds pyvenv.cfg) or already a site-packages folder.
std::string site_packages(const std::string& path) {
    namespace fs = std::filesystem;
    fs::path root(path);
    if (fs::exists(root / "pyvenv.cfg")) {
        root = root / "lib" / ("python" + std::to_string(PY_MAJOR_VERSION) + "." + std::to_string(PY_MINOR_VERSION)) /
               "site-packages";
    }
    return fs::is_directory(root) ? fs::absolute(root).string() : std::string();
}

// Runs `body` holding the GIL; a Python exception becomes PRISM_ERROR (a PrismError) or
// PRISM_INTERNAL with its one-line text in prism_last_error().
template <class Body>
int call_python(Body&& body) {
    if (g_state.load() != State::running) {
        return fail(PRISM_NOT_INITIALIZED, "prism_rt is not initialised: call prism_init first (or it failed, "
                                           "or prism_shutdown was called)");
    }
    py::gil_scoped_acquire gil;
    try {
        body();
        g_error.clear();
        return PRISM_OK;
    } catch (py::error_already_set& e) {
        int status = PyObject_IsInstance(e.value().ptr(), g_prism_error->ptr()) == 1 ? PRISM_ERROR : PRISM_INTERNAL;
        try {
            return fail(status, g_api->attr("error_line")(e.value()).cast<std::string>());
        } catch (const std::exception&) {
            return fail(PRISM_INTERNAL, e.what());
        }
    } catch (const std::exception& e) {
        return fail(PRISM_INTERNAL, std::string("prism_rt_c: ") + e.what());
    }
}

}  // namespace

extern "C" {

int prism_init(const char* venv) {
    if (g_state.load() == State::running) return PRISM_OK;
    if (g_state.load() == State::stopped) {
        return fail(PRISM_NOT_INITIALIZED, "prism_rt was shut down in this process; the interpreter cannot start twice");
    }
    std::string site;
    if (venv != nullptr && *venv != '\0') {
        site = site_packages(venv);
        if (site.empty()) {
            return fail(PRISM_INVALID_ARGUMENT, std::string("prism_init: ") + venv + " is neither a virtual environment "
                        "(a folder with pyvenv.cfg) nor a site-packages folder; pass the venv prism_rt is installed in");
        }
    }
    g_owns_interpreter = !Py_IsInitialized();
    if (g_owns_interpreter) {
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0;  // the host's signals stay the host's
        config.parse_argv = 0;
        if (!site.empty()) config.site_import = 0;  // only the venv's packages, as in the venv itself
        try {
            py::initialize_interpreter(&config, 0, nullptr, false);
        } catch (const std::exception& e) {
            g_state = State::stopped;
            return fail(PRISM_NOT_INITIALIZED, std::string("prism_init: Python did not start: ") + e.what() +
                        "; set PYTHONHOME to the Python installation whose libpython this host links");
        }
    }
    int status = PRISM_OK;
    {
        py::gil_scoped_acquire gil;
        try {
            if (!site.empty()) py::module_::import("site").attr("addsitedir")(site);  // runs the venv's .pth files
            g_api = new py::object(py::module_::import("prism_rt.c_api"));
            g_prism_error = new py::object(py::module_::import("prism_rt.errors").attr("PrismError"));
        } catch (const std::exception& e) {
            status = fail(PRISM_NOT_INITIALIZED, std::string("prism_init: cannot import prism_rt (") + e.what() +
                          "); pass the venv prism_rt is installed in");
        }
    }
    if (g_owns_interpreter) g_init_thread = PyEval_SaveThread();  // host threads take the GIL per call from now on
    g_state = status == PRISM_OK ? State::running : State::stopped;
    if (status == PRISM_OK) g_error.clear();
    return status;
}

prism_engine* prism_engine_load(const char* path, const char* options_json) {
    if (path == nullptr) {
        fail(PRISM_INVALID_ARGUMENT, "prism_engine_load: path is NULL; pass an engine folder or a checkpoint");
        return nullptr;
    }
    prism_engine* engine = nullptr;
    call_python([&] {
        py::object loaded = g_api->attr("load_engine")(path, options_json ? py::str(options_json) : py::str(""));
        engine = new prism_engine{std::move(loaded)};
    });
    return engine;
}

int prism_edit(prism_engine* engine, const char* image_path, const void* pixels, int height, int width, int bits,
               const char* source_caption, const char* const* targets, int n_targets, const char* options_json,
               prism_result** out) {
    if (out == nullptr) return fail(PRISM_INVALID_ARGUMENT, "prism_edit: out is NULL; pass the address of a prism_result*");
    *out = nullptr;
    if (engine == nullptr) return fail(PRISM_INVALID_ARGUMENT, "prism_edit: engine is NULL; load one with prism_engine_load");
    if ((image_path == nullptr) == (pixels == nullptr)) {
        return fail(PRISM_INVALID_ARGUMENT, "prism_edit: give exactly one of image_path and pixels");
    }
    if (pixels != nullptr && (height < 1 || width < 1 || (bits != 8 && bits != 16))) {
        return fail(PRISM_INVALID_ARGUMENT, "prism_edit: a pixel buffer needs height ≥ 1, width ≥ 1 and bits 8 or 16, got " +
                    std::to_string(height) + "×" + std::to_string(width) + " at " + std::to_string(bits) + " bits");
    }
    if (source_caption == nullptr) return fail(PRISM_INVALID_ARGUMENT, "prism_edit: source_caption is NULL");
    if (targets == nullptr || n_targets < 1) {
        return fail(PRISM_INVALID_ARGUMENT, "prism_edit: give at least one target caption (targets, n_targets ≥ 1)");
    }
    for (int i = 0; i < n_targets; ++i) {
        if (targets[i] == nullptr) return fail(PRISM_INVALID_ARGUMENT, "prism_edit: targets[" + std::to_string(i) + "] is NULL");
    }
    auto result = std::make_unique<prism_result>();
    int status = call_python([&] {
        py::list captions;
        for (int i = 0; i < n_targets; ++i) captions.append(py::str(targets[i]));
        py::object image = image_path ? py::object(py::str(image_path)) : py::object(py::none());
        py::object buffer = py::none();
        if (pixels != nullptr) {
            auto size = static_cast<py::ssize_t>(static_cast<size_t>(height) * static_cast<size_t>(width) * (bits / 8));
            buffer = py::memoryview::from_memory(const_cast<void*>(pixels), size, true);  // read-only view
        }
        py::tuple answer = g_api->attr("edit")(engine->engine, image, buffer, height, width, bits, source_caption,
                                               captions, options_json ? options_json : "");
        for (py::handle item : answer[0].cast<py::list>()) {
            auto shaped = item.cast<py::tuple>();
            int h = shaped[0].cast<int>(), w = shaped[1].cast<int>();
            std::string_view bytes = shaped[2].cast<py::bytes>();
            std::vector<uint16_t> image16(static_cast<size_t>(h) * static_cast<size_t>(w));
            if (bytes.size() != image16.size() * sizeof(uint16_t)) throw std::runtime_error("image size mismatch");
            std::memcpy(image16.data(), bytes.data(), bytes.size());
            result->images.push_back(std::move(image16));
            result->shapes.emplace_back(h, w);
        }
        result->json = answer[1].cast<std::string>();
    });
    if (status == PRISM_OK) *out = result.release();
    return status;
}

int prism_result_count(const prism_result* result) {
    return result ? static_cast<int>(result->images.size()) : -1;
}

const uint16_t* prism_result_image(const prism_result* result, int k, int* height, int* width) {
    if (result == nullptr || k < 0 || k >= static_cast<int>(result->images.size())) {
        fail(PRISM_INVALID_ARGUMENT, "prism_result_image: no image " + std::to_string(k) + " (the result has " +
             std::to_string(result ? result->images.size() : 0) + ")");
        return nullptr;
    }
    if (height) *height = result->shapes[k].first;
    if (width) *width = result->shapes[k].second;
    return result->images[k].data();
}

const char* prism_result_json(const prism_result* result) {
    return result ? result->json.c_str() : nullptr;
}

void prism_result_free(prism_result* result) {
    delete result;
}

void prism_engine_free(prism_engine* engine) {
    if (engine == nullptr) return;
    if (g_state.load() != State::running) {  // no interpreter to give the reference back to
        engine->engine.release();
        delete engine;
        return;
    }
    py::gil_scoped_acquire gil;
    delete engine;
}

const char* prism_last_error(void) {
    return g_error.c_str();
}

void prism_shutdown(void) {
    if (g_state.exchange(State::stopped) != State::running) return;
    if (g_owns_interpreter) PyEval_RestoreThread(g_init_thread);
    {
        py::gil_scoped_acquire gil;  // held already where this process owns the interpreter; re-entrant
        delete g_api;
        delete g_prism_error;
        g_api = g_prism_error = nullptr;
    }
    if (g_owns_interpreter) py::finalize_interpreter();
}

}  // extern "C"

// A C++ host of libprism_rt_c: edits the phantom demo patient (remove the support devices),
// writes the counterfactual as a 16-bit PGM, raw uint16 bytes and the result record, then runs
// the same edit from two threads at once on the same engine and checks both equal the first.
//
//   prism_edit [--venv DIR] [--engine DIR] [--image FILE] [--out PREFIX] [--steps N]
//              [--self-replace S] [--threads T]
// Exit status: 0 ok, 1 a prism_rt error (its message on stderr), 2 bad arguments, 3 threads differ.
#include <prism_rt.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace {

const char* kSource = "Chest X-ray showing No Finding, Support Devices";
const char* kTarget = "Chest X-ray showing No Finding";

struct Image {
    int height = 0, width = 0;
    std::vector<uint16_t> pixels;
    std::string json;
    std::string error;  // set where the edit failed
};

// One edit; the counterfactual copied out so the result can be freed at once.
Image edit(prism_engine* engine, const std::string& image, const std::string& options) {
    Image out;
    const char* targets[] = {kTarget};
    prism_result* result = nullptr;
    if (prism_edit(engine, image.c_str(), nullptr, 0, 0, 0, kSource, targets, 1, options.c_str(), &result) != PRISM_OK) {
        out.error = prism_last_error();
        return out;
    }
    const uint16_t* pixels = prism_result_image(result, 0, &out.height, &out.width);
    out.pixels.assign(pixels, pixels + static_cast<size_t>(out.height) * out.width);
    out.json = prism_result_json(result);
    prism_result_free(result);
    return out;
}

// Binary PGM, maxval 65535: two bytes a pixel, most significant first (netpbm's rule).
bool write_pgm(const std::string& path, const Image& image) {
    std::ofstream file(path, std::ios::binary);
    file << "P5\n" << image.width << " " << image.height << "\n65535\n";
    for (uint16_t v : image.pixels) {
        const char bytes[2] = {static_cast<char>(v >> 8), static_cast<char>(v & 0xff)};
        file.write(bytes, 2);
    }
    return static_cast<bool>(file);
}

bool write_bytes(const std::string& path, const void* data, size_t size) {
    std::ofstream file(path, std::ios::binary);
    file.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    return static_cast<bool>(file);
}

}  // namespace

int main(int argc, char** argv) {
    std::string venv = PRISM_EXAMPLE_VENV, engine_dir = PRISM_EXAMPLE_ENGINE, out = "counterfactual";
    std::string image = engine_dir + "/images/phantom-1000003.png", steps = "50", self_replace = "0.5", threads = "2";
    bool image_given = false;
    for (int i = 1; i < argc; ++i) {
        std::string flag = argv[i];
        if (i + 1 >= argc) {
            std::fprintf(stderr, "error: %s needs a value\n", flag.c_str());
            return 2;
        }
        std::string value = argv[++i];
        if (flag == "--venv") venv = value;
        else if (flag == "--engine") engine_dir = value;
        else if (flag == "--image") image = value, image_given = true;
        else if (flag == "--out") out = value;
        else if (flag == "--steps") steps = value;
        else if (flag == "--self-replace") self_replace = value;
        else if (flag == "--threads") threads = value;
        else {
            std::fprintf(stderr, "error: unknown flag %s\n", flag.c_str());
            return 2;
        }
    }
    if (!image_given) image = engine_dir + "/images/phantom-1000003.png";

    if (prism_init(venv.empty() ? nullptr : venv.c_str()) != PRISM_OK) {
        std::fprintf(stderr, "error: %s\n", prism_last_error());
        return 1;
    }
    prism_engine* engine = prism_engine_load(engine_dir.c_str(), ("{\"threads\": " + threads + "}").c_str());
    if (engine == nullptr) {
        std::fprintf(stderr, "error: %s\n", prism_last_error());
        prism_shutdown();
        return 1;
    }
    // JSON numbers are written as given: the test passes plain numbers
    const std::string options = "{\"inversion\": \"direct\", \"steps\": " + steps + ", \"self_replace\": [" +
                                self_replace + "]}";
    Image first = edit(engine, image, options);
    if (!first.error.empty()) {
        std::fprintf(stderr, "error: %s\n", first.error.c_str());
        prism_engine_free(engine);
        prism_shutdown();
        return 1;
    }
    bool written = write_pgm(out + ".pgm", first) &&
                   write_bytes(out + ".raw", first.pixels.data(), first.pixels.size() * sizeof(uint16_t)) &&
                   write_bytes(out + ".json", first.json.data(), first.json.size());
    std::printf("counterfactual %dx%d -> %s.pgm, %s.raw, %s.json\n", first.width, first.height, out.c_str(),
                out.c_str(), out.c_str());

    Image concurrent[2];
    std::thread workers[2];
    for (int t = 0; t < 2; ++t) workers[t] = std::thread([&, t] { concurrent[t] = edit(engine, image, options); });
    for (auto& worker : workers) worker.join();
    int status = written ? 0 : 1;
    for (const Image& other : concurrent) {
        if (!other.error.empty()) {
            std::fprintf(stderr, "error: %s\n", other.error.c_str());
            status = 1;
        } else if (other.pixels != first.pixels || other.height != first.height || other.width != first.width) {
            std::fprintf(stderr, "error: an edit run from two threads differs from the serial one\n");
            status = status ? status : 3;
        }
    }
    if (status == 0) std::printf("two threads: both equal the serial edit\n");
    prism_engine_free(engine);
    prism_shutdown();
    return status;
}

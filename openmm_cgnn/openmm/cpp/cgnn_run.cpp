// cgnn_run: load an exported openmm_cgnn force field (system.xml + cg.pdb) with plain OpenMM and run it.
//
//   cgnn_run EXPORT_DIR/system.xml EXPORT_DIR/cg.pdb [--steps N] [--dt-fs X] [--temperature T]
//            [--report-every K] [--platform NAME] [--plugins DIR] [--seed S]
//
// Without --temperature the run is NVE (VerletIntegrator) from zero velocities, which is
// deterministic on the Reference platform and so comparable with Python to round-off.
// With --temperature it is LangevinMiddle at T with a friction of 1/ps.
//
// The TorchForce inside system.xml is deserialized by openmm-torch's serialization proxy, which
// lives in libOpenMMTorch.so; calling its registration function makes the link explicit (the
// library also registers itself when loaded). The kernels come from the plugin directory.

#include "OpenMM.h"
#include "openmm/serialization/XmlSerializer.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" void registerTorchSerializationProxies();

#ifndef CGNN_DEFAULT_PLUGIN_DIR
#define CGNN_DEFAULT_PLUGIN_DIR ""
#endif

namespace {

struct PdbData {
    std::vector<OpenMM::Vec3> positions;  // nm
    bool hasBox = false;
    OpenMM::Vec3 a, b, c;  // nm
};

double field(const std::string& line, size_t start, size_t width, const std::string& what, const std::string& path) {
    if (line.size() < start + width)
        throw std::runtime_error(path + ": line too short for " + what + ": '" + line + "'");
    try {
        return std::stod(line.substr(start, width));
    } catch (const std::exception&) {
        throw std::runtime_error(path + ": cannot read " + what + " from '" + line + "'");
    }
}

// Box vectors from CRYST1 lengths and angles, in OpenMM's reduced form (a along x, b in the xy plane).
void boxFromCell(double a, double b, double c, double alpha, double beta, double gamma, PdbData& out) {
    const double deg = M_PI / 180.0;
    const double ca = std::cos(alpha * deg), cb = std::cos(beta * deg), cg = std::cos(gamma * deg), sg = std::sin(gamma * deg);
    out.a = OpenMM::Vec3(a, 0, 0);
    out.b = OpenMM::Vec3(b * cg, b * sg, 0);
    const double cx = c * cb;
    const double cy = c * (ca - cb * cg) / sg;
    const double cz = std::sqrt(std::max(c * c - cx * cx - cy * cy, 0.0));
    out.c = OpenMM::Vec3(cx, cy, cz);
    // round-off in the angles must not leave tiny off-diagonal terms OpenMM would reject
    for (OpenMM::Vec3* v : {&out.a, &out.b, &out.c})
        for (int k = 0; k < 3; k++)
            if (std::abs((*v)[k]) < 1e-6) (*v)[k] = 0.0;
    out.hasBox = true;
}

PdbData readPdb(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error(path + ": cannot open PDB file");
    PdbData data;
    std::string line;
    bool inFirstModel = true;
    while (std::getline(in, line)) {
        const std::string record = line.substr(0, 6);
        if (record == "ENDMDL") inFirstModel = false;
        if (!inFirstModel) continue;
        if (record == "CRYST1") {
            const double a = field(line, 6, 9, "a", path), b = field(line, 15, 9, "b", path), c = field(line, 24, 9, "c", path);
            const double alpha = field(line, 33, 7, "alpha", path), beta = field(line, 40, 7, "beta", path),
                         gamma = field(line, 47, 7, "gamma", path);
            boxFromCell(0.1 * a, 0.1 * b, 0.1 * c, alpha, beta, gamma, data);
        } else if (record == "ATOM  " || record == "HETATM") {
            data.positions.emplace_back(0.1 * field(line, 30, 8, "x", path), 0.1 * field(line, 38, 8, "y", path),
                                        0.1 * field(line, 46, 8, "z", path));
        }
    }
    if (data.positions.empty()) throw std::runtime_error(path + ": no ATOM/HETATM records");
    return data;
}

// Whole-string numbers only: std::stoi("12abc") is 12 and "abc" throws only when first used,
// after the System is built; every option is checked before anything is computed.
bool parseInt(const std::string& text, long long lo, long long& out) {
    char* end = nullptr;
    errno = 0;
    const long long value = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno == ERANGE || value < lo || value > 2147483647LL) return false;
    out = value;
    return true;
}

bool parsePositive(const std::string& text, double& out) {
    char* end = nullptr;
    errno = 0;
    const double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(value) || !(value > 0)) return false;
    out = value;
    return true;
}

void usage() {
    std::cerr << "usage: cgnn_run SYSTEM.xml CG.pdb [--steps N] [--dt-fs X] [--temperature T] [--report-every K]\n"
                 "                [--platform NAME] [--plugins DIR] [--seed S]\n";
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        usage();
        return 2;
    }
    const std::string systemPath = argv[1], pdbPath = argv[2];
    std::map<std::string, std::string> opt = {{"--steps", "100"}, {"--dt-fs", "2"},  {"--temperature", ""},
                                              {"--report-every", "10"}, {"--platform", "Reference"},
                                              {"--plugins", ""}, {"--seed", "1"}};
    for (int i = 3; i < argc; i++) {
        const std::string key = argv[i];
        if (!opt.count(key) || i + 1 >= argc) {
            std::cerr << "cgnn_run: unknown option or missing value: " << key << "\n";
            usage();
            return 2;
        }
        opt[key] = argv[++i];
    }
    long long steps = 0, every = 0, seed = 0;
    double dtFs = 0, temperature = 0;
    const struct { const char* name; bool ok; const char* expected; } checks[] = {
        {"--steps", parseInt(opt["--steps"], 0, steps), "a whole number >= 0"},
        {"--report-every", parseInt(opt["--report-every"], 1, every), "a whole number >= 1"},
        {"--seed", parseInt(opt["--seed"], 0, seed), "a whole number >= 0"},
        {"--dt-fs", parsePositive(opt["--dt-fs"], dtFs), "a positive number of fs"},
        {"--temperature", opt["--temperature"].empty() || parsePositive(opt["--temperature"], temperature),
         "a positive number of K"},
    };
    for (const auto& check : checks) {
        if (!check.ok) {
            std::cerr << "cgnn_run: " << check.name << " " << opt[check.name] << ": expected " << check.expected << "\n";
            return 2;
        }
    }
    try {
        std::string pluginDir = opt["--plugins"];
        if (pluginDir.empty() && std::getenv("OPENMM_PLUGIN_DIR")) pluginDir = std::getenv("OPENMM_PLUGIN_DIR");
        if (pluginDir.empty()) pluginDir = CGNN_DEFAULT_PLUGIN_DIR;
        OpenMM::Platform::loadPluginsFromDirectory(pluginDir);
        registerTorchSerializationProxies();

        std::ifstream xml(systemPath);
        if (!xml) throw std::runtime_error(systemPath + ": cannot open system XML");
        std::unique_ptr<OpenMM::System> system(OpenMM::XmlSerializer::deserialize<OpenMM::System>(xml));
        const PdbData pdb = readPdb(pdbPath);
        if ((int) pdb.positions.size() != system->getNumParticles()) {
            std::ostringstream msg;
            msg << pdbPath << ": has " << pdb.positions.size() << " atoms, " << systemPath << " has " << system->getNumParticles()
                << " particles";
            throw std::runtime_error(msg.str());
        }
        if (pdb.hasBox) system->setDefaultPeriodicBoxVectors(pdb.a, pdb.b, pdb.c);

        const double dt = dtFs * 1e-3;
        const bool thermostat = !opt["--temperature"].empty();
        std::unique_ptr<OpenMM::Integrator> integrator;
        if (thermostat) {
            auto* langevin = new OpenMM::LangevinMiddleIntegrator(temperature, 1.0, dt);
            langevin->setRandomNumberSeed((int) seed);
            integrator.reset(langevin);
        } else {
            integrator.reset(new OpenMM::VerletIntegrator(dt));
        }
        OpenMM::Platform& platform = OpenMM::Platform::getPlatformByName(opt["--platform"]);
        OpenMM::Context context(*system, *integrator, platform);
        context.setPositions(pdb.positions);
        if (thermostat) context.setVelocitiesToTemperature(temperature, (int) seed);

        OpenMM::State state = context.getState(OpenMM::State::Energy | OpenMM::State::Forces);
        double forceNorm = 0.0;
        for (const OpenMM::Vec3& f : state.getForces()) forceNorm += f.dot(f);
        std::printf("platform %s\n", context.getPlatform().getName().c_str());
        std::printf("particles %d\n", system->getNumParticles());
        std::printf("initial_potential_energy_kj_mol %.12e\n", state.getPotentialEnergy());
        std::printf("initial_force_norm_kj_mol_nm %.12e\n", std::sqrt(forceNorm));
        std::printf("step potential_kj_mol kinetic_kj_mol total_kj_mol\n");
        for (int done = 0; done < steps;) {
            const int chunk = (int) std::min(every, steps - done);
            integrator->step(chunk);
            done += chunk;
            state = context.getState(OpenMM::State::Energy);
            const double pe = state.getPotentialEnergy(), ke = state.getKineticEnergy();
            if (!std::isfinite(pe) || !std::isfinite(ke)) {
                std::fprintf(stderr, "cgnn_run: energy became NaN/inf at step %d\n", done);
                return 3;
            }
            std::printf("%d %.12e %.12e %.12e\n", done, pe, ke, pe + ke);
        }
        return 0;
    } catch (const std::exception& e) {
        std::cerr << "cgnn_run: error: " << e.what() << "\n";
        return 1;
    }
}

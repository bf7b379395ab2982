package dev.mobileqat.core;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** The parts of a package's {@code manifest.json} an app needs (format "mobileqat-package", version 1). */
public final class Manifest {
    /** The model's input: shape (1, H, W, C), dtype, scale and zero point. */
    public static final class Input {
        public int[] shape;
        public String dtype;
        public double scale;
        public int zeroPoint;

        public int height() {
            return shape[1];
        }

        public int width() {
            return shape[2];
        }

        public int channels() {
            return shape[3];
        }

        public int itemsize() {
            return dtype.equals("float32") ? 4 : 1;
        }
    }

    /** How an image becomes the input tensor. */
    public static final class Preprocessing {
        public String color;
        public String resizeMethod;
        public String pixels;
        public float[] mean;
        public float[] std;
    }

    /** The model's output: shape, dtype, scale, zero point. */
    public static final class Output {
        public int[] shape;
        public String dtype;
        public double scale;
        public int zeroPoint;
        public String meaning;
    }

    public Input input = new Input();
    public Preprocessing preprocessing = new Preprocessing();
    public Output output = new Output();
    public String modelFile;
    public String modelSha256;
    public List<String> goldenImages = new ArrayList<>();
    /** Relative path -> expected sha256, for every file but the model. */
    public Map<String, String> fileSha256 = new LinkedHashMap<>();
    /** Relative path -> expected size in bytes. */
    public Map<String, Long> fileBytes = new LinkedHashMap<>();
    public JsonObject json;

    public static Manifest parse(String text) throws PackageException {
        try {
            JsonObject j = JsonParser.parseString(text).getAsJsonObject();
            if (!j.has("format") || !"mobileqat-package".equals(j.get("format").getAsString())) {
                throw new PackageException("manifest.json: not a mobileqat package manifest (format field).");
            }
            if (j.get("format_version").getAsInt() != 1) {
                throw new PackageException("manifest.json: format_version " + j.get("format_version")
                        + ", this app reads 1; update the app or re-export the package.");
            }
            Manifest m = new Manifest();
            m.json = j;
            JsonObject in = j.getAsJsonObject("input");
            m.input.shape = ints(in.getAsJsonArray("shape"));
            m.input.dtype = in.get("dtype").getAsString();
            m.input.scale = number(in, "scale", 1.0);
            m.input.zeroPoint = (int) number(in, "zero_point", 0.0);
            JsonObject p = j.getAsJsonObject("preprocessing");
            m.preprocessing.color = p.get("color").getAsString();
            m.preprocessing.resizeMethod = p.getAsJsonObject("resize").get("method").getAsString();
            m.preprocessing.pixels = p.get("pixels").getAsString();
            m.preprocessing.mean = floats(p.get("mean"));
            m.preprocessing.std = floats(p.get("std"));
            JsonObject out = j.getAsJsonObject("output");
            m.output.shape = ints(out.getAsJsonArray("shape"));
            m.output.dtype = out.get("dtype").getAsString();
            m.output.scale = number(out, "scale", 1.0);
            m.output.zeroPoint = (int) number(out, "zero_point", 0.0);
            m.output.meaning = out.has("meaning") ? out.get("meaning").getAsString() : "";
            JsonObject model = j.getAsJsonObject("model");
            m.modelFile = model.get("file").getAsString();
            m.modelSha256 = model.get("sha256").getAsString();
            for (JsonElement e : j.getAsJsonObject("golden").getAsJsonArray("images")) {
                m.goldenImages.add(e.getAsString());
            }
            for (Map.Entry<String, JsonElement> e : j.getAsJsonObject("files").entrySet()) {
                JsonObject f = e.getValue().getAsJsonObject();
                m.fileSha256.put(e.getKey(), f.get("sha256").getAsString());
                m.fileBytes.put(e.getKey(), f.get("bytes").getAsLong());
            }
            return m;
        } catch (JsonParseException | IllegalStateException | NullPointerException | UnsupportedOperationException e) {
            throw new PackageException("manifest.json: unreadable or incomplete (" + e.getMessage()
                    + "); re-export the package.");
        }
    }

    private static double number(JsonObject o, String key, double fallback) {
        JsonElement e = o.get(key);
        return e == null || e.isJsonNull() ? fallback : e.getAsDouble();
    }

    private static int[] ints(JsonArray a) {
        int[] out = new int[a.size()];
        for (int i = 0; i < out.length; i++) out[i] = a.get(i).getAsInt();
        return out;
    }

    private static float[] floats(JsonElement e) {
        if (e == null || e.isJsonNull()) return null;
        if (e.isJsonPrimitive()) return new float[]{e.getAsFloat(), e.getAsFloat(), e.getAsFloat()};
        JsonArray a = e.getAsJsonArray();
        float[] out = new float[a.size()];
        for (int i = 0; i < out.length; i++) out[i] = a.get(i).getAsFloat();
        return out;
    }
}

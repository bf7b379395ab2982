package dev.mobileqat.demo;

import android.app.Activity;
import android.os.Build;
import android.os.Bundle;
import android.widget.TextView;
import dev.mobileqat.core.GoldenCheck;
import java.util.List;

/**
 * The golden vectors on this phone: the same check as `mobileqat device-check` (file hashes, preprocessing of the
 * golden PNGs byte for byte, XNNPACK output codes bit for bit against golden/xnnpack.bin, latency).
 */
public class ValidateActivity extends Activity {
    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        setContentView(R.layout.activity_validate);
        new Thread(() -> {
            String text;
            try {
                text = validate();
            } catch (Exception e) {
                text = "FAIL\n" + e.getMessage();
            }
            String shown = text;
            runOnUiThread(() -> ((TextView) findViewById(R.id.report)).setText(shown));
        }).start();
    }

    private String validate() throws Exception {
        GoldenCheck check = new GoldenCheck(Assets.packageFiles(getAssets()));
        StringBuilder s = new StringBuilder(Build.MANUFACTURER + " " + Build.MODEL + ", " + Build.SUPPORTED_ABIS[0] + "\n\n");
        check.verifyFiles();
        s.append("files: sizes and sha256 as in the manifest\n");
        List<Integer> bad = check.preprocessingMismatches(Assets::decode);
        s.append("preprocessing: ").append(check.manifest.goldenImages.size() - bad.size()).append("/")
                .append(check.manifest.goldenImages.size()).append(" golden PNGs give the stored input tensor")
                .append(bad.isEmpty() ? "" : " (first differing: image " + bad.get(0) + ")").append("\n");
        long[] nanos = new long[check.manifest.goldenImages.size()];
        GoldenCheck.Comparison c;
        try (LiteRt model = new LiteRt(getAssets(), Assets.PACKAGE + check.manifest.modelFile, 1)) {
            c = check.run(model, "xnnpack.bin", nanos);
        }
        s.append("XNNPACK: ").append(c).append("\n");
        s.append(String.format("latency: median %.2f ms, p90 %.2f ms (1 thread)%n",
                GoldenCheck.quantileMs(nanos, 0.5), GoldenCheck.quantileMs(nanos, 0.9)));
        boolean pass = bad.isEmpty() && c.pass();
        return (pass ? "PASS" : "FAIL") + "\n\n" + s;
    }
}
